"""``python -m worker``: the same as ``mlf worker`` (which sets up logging itself)."""

import typer

from worker.cli import worker

if __name__ == "__main__":
    typer.run(worker)
