"""`nvfp4 eval TEACHER STUDENT...`: held-out KL, top-1, greedy agreement and perplexity, as a table."""

import json
from pathlib import Path

import click

from nvfp4.converter.checkpoint import load_nvfp4_checkpoint
from nvfp4.converter.evaluate import build_eval_set, evaluate, format_table
from nvfp4.converter.models import load_causal_lm, resolve_model


def _nvfp4_folder(path: str) -> Path | None:
    """OUT/trtllm for an output folder of this tool (OUT or OUT/trtllm given), else None."""
    folder = Path(path)
    if (folder / "trtllm" / "hf_quant_config.json").is_file():
        folder = folder / "trtllm"
    return folder if (folder / "hf_quant_config.json").is_file() else None


def load_student(path: str):
    """An NVFP4 output folder of this tool (OUT or OUT/trtllm) or any model `converter` loads."""
    folder = _nvfp4_folder(path)
    return load_nvfp4_checkpoint(folder)[0] if folder else load_causal_lm(path)[0]


@click.command("eval")
@click.argument("teacher")
@click.argument("students", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def eval_command(teacher: str, students: tuple[str, ...], json_path: Path | None) -> None:
    """Compare STUDENTS (NVFP4 output folders or any checkpoint) with TEACHER on held-out material."""
    teacher = None if teacher == "default" else teacher
    for path in [teacher, *students]:  # a typo fails in one line before minutes of loading
        if path is None or _nvfp4_folder(path) is None:
            resolve_model(path)
    teacher_model, tokenizer, _ = load_causal_lm(teacher)
    data = build_eval_set(teacher_model, tokenizer)
    models = {}
    for index, path in enumerate(students):
        name = Path(path).name or f"student{index}"
        models[f"{name}#{index}" if name in models or name == "BF16" else name] = load_student(path)
    results = evaluate(teacher_model, models, tokenizer, data)
    click.echo(format_table(results))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))

