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


def user_code(files):
    """A context manager: exceptions raised in the user's own code become :class:`UsageError`.

    ``files`` are the source files of the user's model (a model file, the module of a plain
    callable). An exception whose traceback passes through one of them is the user's: it is
    re-raised as a UsageError naming the innermost such ``file:line`` and the exception's
    message (exit code 2 on the command line). Any other exception propagates unchanged: a
    bug in ppvi stays an internal error.
    """
    import contextlib
    import os
    import traceback

    wanted = {os.path.realpath(str(name)) for name in files if name}

    @contextlib.contextmanager
    def boundary():
        try:
            yield
        except (UsageError, TrainingDiverged, KeyboardInterrupt):
            raise
        except BaseException as error:  # SystemExit from a user's file at import, too
            frames = [frame for frame in traceback.extract_tb(error.__traceback__) if os.path.realpath(frame.filename) in wanted]
            if not frames:
                raise
            where = frames[-1]
            message = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
            raise UsageError(f"{where.filename}:{where.lineno}: {type(error).__name__} in your code: {message}") from error

    return boundary()
