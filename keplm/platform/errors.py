"""User-facing errors: every job turns these into one clear line and a non-zero exit."""


class KeplmError(Exception):
    """An error caused by the user's input or config; printed as one line, no traceback."""

    exit_code = 2


class ConfigError(KeplmError):
    """A config file, key or value is wrong. The message names the dotted key."""
