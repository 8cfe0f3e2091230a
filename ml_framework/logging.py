"""Logging set-up shared by producer and worker processes.

The record format is the one the production guide specifies::

    %(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

_configured = False


def configure_logging(level: str = "INFO") -> None:
    """Send ``ml_framework``, ``producer`` and ``worker`` records to stdout.

    Idempotent: a second call only changes the level.

    Args:
        level: a standard level name (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``).
    """
    global _configured
    level_no = logging.getLevelName(level.upper())
    for name in ("ml_framework", "producer", "worker", "demo"):
        logger = logging.getLogger(name)
        logger.setLevel(level_no)
        if not _configured:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(handler)
            logger.propagate = False
    _configured = True
