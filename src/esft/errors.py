"""Errors that mean "the user must change something": the CLI prints them as one line, no traceback."""


class EsftError(Exception):
    """A user-facing error. The message says what is wrong and what to change."""


class ConfigError(EsftError):
    """A configuration value is missing, malformed or out of range."""


class ModelError(EsftError):
    """A model could not be found, verified or loaded."""


class DataError(EsftError):
    """A dataset file is missing or malformed."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line for a one-line error: its first line, or its type's name when
    it has no message (many library errors span pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
