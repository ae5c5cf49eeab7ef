"""The one base class of every error a user can fix: bad config, data, checkpoint, run dir.

The command line prints these as one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the input, named in the message; not a bug in scanclust."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the offending key or file."""
