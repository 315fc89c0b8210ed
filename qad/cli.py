"""`nvfp4 eval TEACHER STUDENT...`: held-out KL, top-1, greedy agreement and perplexity, as a table."""

import json
from pathlib import Path

import click

from converter.checkpoint import load_nvfp4_checkpoint
from converter.evaluate import build_eval_set, evaluate, format_table
from converter.models import load_causal_lm


def load_student(path: str):
    """An NVFP4 output folder of this tool (OUT or OUT/trtllm) or any model `converter` loads."""
    folder = Path(path)
    if (folder / "trtllm" / "hf_quant_config.json").is_file():
        folder = folder / "trtllm"
    if (folder / "hf_quant_config.json").is_file():
        return load_nvfp4_checkpoint(folder)[0]
    return load_causal_lm(path)[0]


@click.command("eval")
@click.argument("teacher")
@click.argument("students", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def eval_command(teacher: str, students: tuple[str, ...], json_path: Path | None) -> None:
    """Compare STUDENTS (NVFP4 output folders or any checkpoint) with TEACHER on held-out material."""
    teacher_model, tokenizer, _ = load_causal_lm(None if teacher == "default" else teacher)
    data = build_eval_set(teacher_model, tokenizer)
    models = {_row_name(path, i): load_student(path) for i, path in enumerate(students)}
    results = evaluate(teacher_model, models, tokenizer, data)
    click.echo(format_table(results))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


def _row_name(path: str, index: int) -> str:
    return Path(path).name or f"student{index}"
