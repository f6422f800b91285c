"""ArviZ, imported once and quietly, and a context that silences the warnings our reports put in words."""

from __future__ import annotations

import contextlib
import logging
import warnings

with warnings.catch_warnings():  # ArviZ announces its refactor once a day on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["az", "quiet"]


@contextlib.contextmanager
def quiet():
    """ArviZ's UserWarnings, RuntimeWarnings and log lines (e.g. "Shape validation failed" for one chain) off for a block."""
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
