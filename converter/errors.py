"""The one exception type that the CLI turns into a single clear line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (path, model, option): reported as one line, never a traceback."""
