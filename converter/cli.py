"""The converter's commands: `convert`, `verify` and `eval` (mapped in nvfp4/cli.py). Each is a thin map from
flags to the library's configs; a training package's flags (nvfp4.qad) join `convert` through
converter/stages.py's `TRAINING_FLAGS`."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
from click.core import ParameterSource

from nvfp4.converter.config import CHOICES, EXPERT_CALIBRATIONS, SCHEMES, QuantConfig
from nvfp4.converter.layout import TARGETS, student_folder
from nvfp4.converter.pipeline import ConvertConfig, convert
from nvfp4.converter.recipe import DTYPES, ConvertRecipe
from nvfp4.converter.stages import TRAINING_FLAGS
from nvfp4.errors import UserError
from nvfp4.output import show_messages

QUANT_FLAGS = ("scheme", "exclude", "scale_search", "rounding", "smooth_alpha", "expert_calibration")


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


CONVERT_OPTIONS = [
    click.Argument(["model"], required=False),
    click.Option(["-o", "--out"], type=click.Path(path_type=Path), required=True, help="Output folder."),
    click.Option(
        ["--scheme"],
        type=click.Choice(SCHEMES),
        default="nvfp4",
        show_default=True,
        help="nvfp4 = W4A4 (Blackwell); nvfp4-a16 = weight-only (Hopper, Ampere).",
    ),
    click.Option(["--targets"], default=",".join(TARGETS), show_default=True, help="Comma-separated export targets."),
    click.Option(
        ["--calib-data"],
        default="self",
        show_default=True,
        help="self (the teacher's answers to shipped prompts) | prompts (those prompts alone) | random | "
        "PATH (txt or JSONL).",
    ),
    click.Option(["--calib-tokens"], type=int, default=2048, show_default=True),
    click.Option(
        ["--exclude"], multiple=True, help="fnmatch pattern of module names to keep unquantized (repeatable)."
    ),
    click.Option(
        ["--scale-search"],
        type=click.Choice(CHOICES["scale_search"]),
        default=None,
        help="amax = ModelOpt's bytes; mse / mse-act search each block's FP8 scale. Default: mse-act when "
        "QAD learns the scales (their start), else amax (PTQ, --qad-scale-lr 0).",
    ),
    click.Option(
        ["--rounding"],
        type=click.Choice(CHOICES["rounding"]),
        default="nearest",
        show_default=True,
        help="nearest = ModelOpt's bytes; gptq = GPTQ error-compensated rounding (runs calibration).",
    ),
    click.Option(
        ["--smooth-alpha"],
        type=float,
        default=None,
        help="SmoothQuant-style channel smoothing folded into norms, v_proj and up_proj (0 = off). "
        "Default: 0.5 for a W4A4 QAD pass (its start), else 0 (ModelOpt's bytes).",
    ),
    click.Option(
        ["--expert-calibration"],
        type=click.Choice(EXPERT_CALIBRATIONS),
        default="all",
        show_default=True,
        help="MoE: every expert sees every calibration token (its statistics only), or only the tokens the "
        "router sends it (ModelOpt's input scales).",
    ),
    click.Option(
        ["--layerwise"],
        is_flag=True,
        help="PTQ one decoder layer at a time, reading the weights from the shards and writing every target "
        "as they stream (peak memory: about two layers); chosen by itself when the model does not fit.",
    ),
    click.Option(["--dry-run"], is_flag=True, help="Print the memory and disk plan and stop."),
    click.Option(["--seed"], type=int, default=0, show_default=True),
    click.Option(["--device"], type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.Option(
        ["--dtype"],
        type=click.Choice(list(DTYPES)),
        default="bfloat16",
        show_default=True,
        help="dtype of the tensors left unquantized.",
    ),
    click.Option(["--force"], is_flag=True, help="Replace an existing OUT."),
    click.Option(["--trust-remote-code"], is_flag=True),
    click.Option(["--no-eval"], is_flag=True, help="Skip the held-out accuracy section of the report."),
    click.Option(
        ["--recipe"],
        type=click.Path(path_type=Path),
        default=None,
        help="Run the recipe of an earlier convert (its OUT/report.json, or a recipe JSON); flags given here "
        "override it.",
    ),
]


RECIPE_FLAGS = ("targets", "calib_data", "calib_tokens", "seed", "dtype")
RUN_FLAGS = ("device", "force", "trust_remote_code", "layerwise", "dry_run")
FLAGS = {name: "--" + name.replace("_", "-") for name in QUANT_FLAGS + RECIPE_FLAGS + RUN_FLAGS}


def quant_config(flags: dict) -> QuantConfig:
    """The quantization the flags ask for, a training package's defaults filling what they leave unset."""
    defaults = {}
    for training in TRAINING_FLAGS:
        defaults |= training.quant_defaults(flags, flags["scheme"])
    chosen = {k: flags[k] for k in QUANT_FLAGS if flags[k] is not None}
    return QuantConfig(**({"scale_search": "amax", "smooth_alpha": 0.0} | defaults | chosen))


def _given(flags: dict) -> set[str]:
    """The flags typed on the command line (not left at their defaults)."""
    context = click.get_current_context()
    return {name for name in flags if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}


def _from_recipe(flags: dict) -> tuple[dict, dict | None]:
    """--recipe: the flags the command line leaves unset take the recipe's values; -> (flags, the recipe's
    training settings)."""
    recipe = ConvertRecipe.load(flags["recipe"])
    values = recipe.quant.to_dict() | {
        "exclude": tuple(recipe.quant.exclude),
        "targets": ",".join(recipe.targets),
        "calib_data": recipe.calib_data,
        "calib_tokens": recipe.calib_tokens,
        "seed": recipe.seed,
        "dtype": recipe.dtype,
    }
    for training in TRAINING_FLAGS:
        values |= training.from_settings(recipe.training)
    given = _given(flags)
    return flags | {k: v for k, v in values.items() if k in flags and k not in given}, recipe.training


def convert_config(flags: dict) -> ConvertConfig:
    return ConvertConfig(
        out=flags["out"],
        source=flags["model"],
        quant=quant_config(flags),
        targets=_targets(flags["targets"]),
        calib_data=flags["calib_data"],
        calib_tokens=flags["calib_tokens"],
        seed=flags["seed"],
        device=flags["device"],
        dtype=flags["dtype"],
        force=flags["force"],
        trust_remote_code=flags["trust_remote_code"],
        evaluate=not flags["no_eval"],
        layerwise=flags["layerwise"],
        dry_run=flags["dry_run"],
    )


def _training(flags: dict, settings: dict | None, started: float):
    stages = [t.build(flags, flags["seed"], started, settings) for t in TRAINING_FLAGS]
    return next((stage for stage in stages if stage is not None), None)


def _unwind_on_sigterm() -> None:
    """SIGTERM (docker stop, a scheduler's kill) unwinds as Ctrl-C does: the temporary output is removed."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_convert(**flags) -> None:
    """Quantize MODEL (HF folder or .gguf; default: embedded SmolLM2-135M-Instruct) to NVFP4 and export it."""
    started = time.monotonic()
    show_messages()
    _unwind_on_sigterm()
    words = FLAGS | {field: flag for t in TRAINING_FLAGS for field, flag in t.flags.items()}
    try:
        flags, settings = _from_recipe(flags) if flags["recipe"] else (flags, None)
        cfg = convert_config(flags)
        report = convert(cfg, _training(flags, settings, started))
    except UserError as error:
        raise UserError(error.worded(words)) from error
    if report is None:
        return
    click.echo(f"wrote {cfg.out}: " + ", ".join(f"{t} {report.size_vs_bf16[t]:.2f}x BF16" for t in cfg.targets))
    if report.accuracy:
        click.echo(report.accuracy["table"])


def convert_command() -> click.Command:
    """`nvfp4 convert`, with the flags of every registered training package."""
    params = CONVERT_OPTIONS + [option for training in TRAINING_FLAGS for option in training.options]
    return click.Command("convert", callback=run_convert, params=params, help=run_convert.__doc__)


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Chat prompt whose logits are compared (default: a fixed question).")
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Max relative logit difference, for every target (default: each reader's rule).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def verify(out: Path, prompt: str | None, tolerance: float | None, json_path: Path | None) -> None:
    """Reload each target in OUT through an independent reader and compare its logits with the student's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    show_messages()
    from nvfp4.converter import verify as checks

    rows = checks.verify(out, prompt or checks.DEFAULT_PROMPT, tolerance)
    click.echo(checks.render(rows))
    if json_path is not None:
        checks.write_json(rows, json_path)
    failed = [r.target for r in rows if not r.ok]
    if failed:
        click.echo(f"verify: {', '.join(failed)} differ from the student beyond tolerance", err=True)
        raise SystemExit(1)


def _nvfp4_folder(path: str) -> Path | None:
    """The student checkpoint of an output folder of this tool (OUT or OUT/modelopt given), else None."""
    folder = Path(path)
    if (student_folder(folder) / "hf_quant_config.json").is_file():
        folder = student_folder(folder)
    return folder if (folder / "hf_quant_config.json").is_file() else None


def load_student(path: str):
    """An NVFP4 output folder of this tool (OUT or OUT/modelopt) or any model `converter` loads."""
    from nvfp4.converter.checkpoint import load_nvfp4_checkpoint
    from nvfp4.converter.models import load_causal_lm

    folder = _nvfp4_folder(path)
    return load_nvfp4_checkpoint(folder)[0] if folder else load_causal_lm(path)[0]


@click.command("eval")
@click.argument("teacher")
@click.argument("students", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def eval_command(teacher: str, students: tuple[str, ...], json_path: Path | None) -> None:
    """Compare STUDENTS (NVFP4 output folders or any checkpoint) with TEACHER on held-out material."""
    from nvfp4.converter.evaluate import build_eval_set, evaluate, format_table
    from nvfp4.converter.models import load_causal_lm, resolve_model

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
