"""The one exception type that the CLI turns into a single clear line and exit code 2, and the check that
names the extra to install when an optional dependency is missing. A leaf: it imports nothing of ours."""

import importlib
from collections.abc import Mapping
from types import ModuleType


class UserError(Exception):
    """Bad input from the user (path, model, option): reported as one line, never a traceback.

    The library words a bad setting by its config field, quoted: "`qad.steps` must be >= 0"; `field` names
    it, and the CLI rewrites it as the flag that set it (`worded`), so library callers and CLI users each
    read their own names."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def worded(self, flags: Mapping[str, str]) -> str:
        """The message with the field's name replaced by its flag, where `flags` knows it."""
        message = str(self)
        if self.field is not None and self.field in flags:
            message = message.replace(f"`{self.field}`", flags[self.field])
        return message


def require(extra: str, *modules: str) -> ModuleType:
    """Import `modules` (dotted names) of the optional `extra`; -> the last one. A missing one is a UserError
    naming the install command."""
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise UserError(
                f"{name.partition('.')[0]} is not installed ({error}): pip install 'nvfp4[{extra}]'"
            ) from error
    return module
