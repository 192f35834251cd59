"""Start the arq worker: ``python -m workers``."""

from __future__ import annotations

import logging

from arq import run_worker

from billing.settings import get_settings
from workers.settings import WorkerSettings


def main() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run_worker(WorkerSettings)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
