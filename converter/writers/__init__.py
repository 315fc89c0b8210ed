"""Export targets: one Writer class per format (converter/writers/base.py), registered by name."""

from nvfp4.converter.writers.base import TOKENIZER_LOCK, Entry, Writer, entries, packed_weights, student_entries


def load_all_writers() -> dict[str, type[Writer]]:
    """Import every target module so that it registers itself."""
    from nvfp4.converter.writers import gguf, hf  # noqa: F401

    return Writer.targets


__all__ = ["TOKENIZER_LOCK", "Entry", "Writer", "entries", "load_all_writers", "packed_weights", "student_entries"]
