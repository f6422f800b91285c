"""Errors that ppvi turns into a one-paragraph message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: unknown name, malformed data, impossible combination.

    The command line prints the message (no traceback) and exits with code 2.
    """


class DataError(UsageError):
    """Data that cannot be used: missing file, wrong shape, NaN, non-numeric values."""


class TrainingDiverged(RuntimeError):
    """The ELBO became NaN or infinite during training (exit code 1, last good checkpoint kept)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
