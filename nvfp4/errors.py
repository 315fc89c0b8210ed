"""The one exception type that the CLI turns into a single clear line and exit code 2, and the check that
names the extra to install when an optional dependency is missing. A leaf: it imports nothing of ours."""

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input from the user (path, model, option): reported as one line, never a traceback."""


def require(extra: str, *modules: str) -> ModuleType:
    """Import `modules` (dotted names) of the optional `extra`; -> the last one. A missing one is a UserError
    naming the install command."""
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise UserError(f"{name.partition('.')[0]} is not installed ({error}): pip install 'nvfp4[{extra}]'") from error
    return module
