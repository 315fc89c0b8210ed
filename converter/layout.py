"""A convert's output folder: one folder per target, report.json (converter/report.py) and report.md.

OUT/modelopt is the student checkpoint: ModelOpt's unified Hugging Face format, which TensorRT-LLM, vLLM
(`modelopt_fp4`) and SGLang load, and from which `eval`, `verify` and the native server read the student.
OUT/vllm holds the same student as compressed-tensors and OUT/llamacpp as a GGUF. Outputs written before
the student's folder had its name call it OUT/trtllm; every reader still finds it there.
"""

from pathlib import Path

STUDENT = "modelopt"
TARGETS = (STUDENT, "vllm", "llamacpp")
ALIASES = {"trtllm": STUDENT}  # --targets trtllm: the engine's name for the format it loads
LEGACY_FOLDERS = {STUDENT: "trtllm"}


def canonical_target(name: str) -> str:
    return ALIASES.get(name, name)


def target_folder(out: Path, target: str) -> Path:
    """OUT/<target>, or the folder an older output used for it where only that one exists."""
    folder = Path(out) / target
    legacy = Path(out) / LEGACY_FOLDERS.get(target, target)
    return legacy if not folder.exists() and legacy.exists() else folder


def student_folder(out: Path) -> Path:
    return target_folder(out, STUDENT)
