"""The errors a user can cause, defined once.

A command line (`sga_jax.cli`) reports any of `USER_ERRORS` as one `error:` line and exit status 2;
anything else is a bug and keeps its traceback. Library code raises the narrowest of these that
fits, with a message that names the file, key or field, what it found and what was expected.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work: a config field (`config.a.b`), a model config field or a
    command-line value, named with its value and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors, a bad or
    truncated file, or a pickle that is refused."""


class HubError(OSError):
    """A Hugging Face hub id that cannot be resolved: no such repo or revision, a gated or private
    repo without access, or no cached copy while offline. The message says what to do."""


class UsageError(ValueError):
    """Command-line arguments that do not parse: an unknown flag, a missing argument, a bad value."""


# OSError covers missing and unreadable files (FileNotFoundError, PermissionError, ...).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, UsageError, OSError)
