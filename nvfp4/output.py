"""The one channel for what the library says while it works: `logging`, under the `nvfp4` logger. A command
shows it on stderr through tqdm, so progress bars stay whole: info as it is, warnings prefixed. A leaf module."""

import logging
import sys

from tqdm import tqdm


class _BesideProgressBars(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)  # the stderr of the moment (a test runner swaps it)
        except Exception:  # noqa: BLE001 - logging's own contract: a failing handler reports, never raises
            self.handleError(record)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def show_messages(level: int = logging.INFO) -> None:
    """Print the library's messages of `level` and above on stderr (once per process)."""
    logger = logging.getLogger("nvfp4")
    if not any(isinstance(handler, _BesideProgressBars) for handler in logger.handlers):
        handler = _BesideProgressBars()
        handler.setFormatter(_Plain())
        logger.addHandler(handler)
    logger.setLevel(level)
