# The Purchase Credits app image: one image for the API (`python -m api`), the arq worker
# (`python -m workers`), the one-shot migration (`python -m api --migrate-only`) and
# reconciliation (`python -m runtime.reconcile`).
# docker-compose.yml builds it; see README.md, "Deploying with compose".
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CREDITS_ENV=production \
    HOST=0.0.0.0 \
    PORT=8000

# Runtime dependencies only (`pip install .`, not `.[dev]`), installed by root into
# site-packages: the app user can run the code but not change it.
WORKDIR /src
COPY pyproject.toml ./
COPY api ./api
COPY billing ./billing
COPY runtime ./runtime
COPY workers ./workers
RUN pip install . && cd / && rm -rf /src

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/credits credits
WORKDIR /home/credits
USER credits

EXPOSE 8000

# Liveness of the API process. The worker service overrides it (it serves no HTTP).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

# Applies pending migrations, then serves; compose runs the migration as its own service.
CMD ["python", "-m", "api"]
