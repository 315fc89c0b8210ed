"""converter package."""

from nvfp4.converter import stages  # noqa: F401 - registers the PTQ stages: their names are QuantConfig's choices
