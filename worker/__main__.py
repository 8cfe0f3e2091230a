"""``python -m worker``: the same as ``mlf worker``."""

import typer

from ml_framework.logging import configure_logging
from ml_framework.settings import get_settings
from worker.cli import worker

if __name__ == "__main__":
    configure_logging(get_settings().logging_level, get_settings())
    typer.run(worker)
