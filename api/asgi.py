"""ASGI entry point for uvicorn: ``uvicorn api.asgi:app``."""

from api.app import create_app
from api.runtime import settle_heap

app = create_app()
settle_heap()  # what exists now lives as long as the process: api/runtime.py
