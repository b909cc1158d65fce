"""Errors for bad user input. ``tr1`` prints these as one clear line (no traceback) and exits with 2.

Messages name the file, line or field, and the offending value, and suggest the fix where one is known.
"""


class UserError(Exception):
    """Bad input from the user: a config, a data file, a checkpoint, a command-line value."""


class ConfigError(UserError, ValueError):
    """A config file or ``key.sub=value`` override is wrong."""


class DataError(UserError, ValueError):
    """An annotation file, video or data config is missing or malformed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing tensors, has unexpected ones, or does not match the requested layout."""
