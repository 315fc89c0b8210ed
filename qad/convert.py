"""`nvfp4 convert`: the converter's stages with the QAD pass plugged in between calibration and export.

It lives in `qad` because dependencies flow kernels <- converter <- qad: this is the one place that
knows both.
"""

import os
import time
from pathlib import Path

import click

from nvfp4.converter.config import EXPERT_CALIBRATIONS, ROUNDINGS, SCALE_SEARCHES, SCHEMES, QuantConfig
from nvfp4.converter.pipeline import DTYPES, TARGETS, ConvertConfig
from nvfp4.converter.pipeline import convert as run_convert
from nvfp4.errors import UserError
from nvfp4.qad.config import MODES, QADConfig


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@click.command("convert")
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--scheme", type=click.Choice(SCHEMES), default="nvfp4", show_default=True,
              help="nvfp4 = W4A4 (Blackwell); nvfp4-a16 = weight-only (Hopper, Ampere).")
@click.option("--targets", default=",".join(TARGETS), show_default=True, help="Comma-separated export targets.")
@click.option("--calib-data", default="self", show_default=True,
              help="self (the teacher's answers to shipped prompts) | prompts (those prompts alone) | random | PATH (txt or JSONL).")
@click.option("--calib-tokens", type=int, default=2048, show_default=True)
@click.option("--exclude", multiple=True, help="fnmatch pattern of module names to keep unquantized (repeatable).")
@click.option("--scale-search", type=click.Choice(SCALE_SEARCHES), default=None,
              help="amax = ModelOpt's bytes; mse / mse-act search each block's FP8 scale. Default: mse-act when "
                   "QAD learns the scales (their start), else amax (PTQ, --qad-scale-lr 0).")
@click.option("--rounding", type=click.Choice(ROUNDINGS), default="nearest", show_default=True,
              help="nearest = ModelOpt's bytes; gptq = GPTQ error-compensated rounding (runs calibration).")
@click.option("--smooth-alpha", type=float, default=None,
              help="SmoothQuant-style channel smoothing folded into norms, v_proj and up_proj (0 = off). "
                   "Default: 0.5 for a W4A4 QAD pass (its start), else 0 (ModelOpt's bytes).")
@click.option("--expert-calibration", type=click.Choice(EXPERT_CALIBRATIONS), default="all", show_default=True,
              help="MoE: every expert sees every calibration token (its statistics only), or only the tokens the "
                   "router sends it (ModelOpt's input scales).")
@click.option("--layerwise", is_flag=True,
              help="PTQ one decoder layer at a time, reading the weights from the shards and writing every target as "
                   "they stream (peak memory: about two layers); chosen by itself when the model does not fit.")
@click.option("--dry-run", is_flag=True, help="Print the memory and disk plan and stop.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True,
              help="dtype of the tensors left unquantized.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--no-eval", is_flag=True, help="Skip the held-out accuracy section of the report.")
@click.option("--qad-steps", type=int, default=None, help="0 = PTQ only; default: as many as the budget allows.")
@click.option("--qad-lr", type=float, default=None, help="Peak learning rate (cosine decay with warmup).")
@click.option("--qad-scale-lr", type=float, default=None,
              help="Peak learning rate of the block scales (trained as logarithms, LSQ-style); default 3e-3, "
                   "0 = fixed scales.")
@click.option("--qad-batch", type=int, default=None)
@click.option("--qad-seq-len", type=int, default=None)
@click.option("--qad-budget-minutes", type=float, default=None)
@click.option("--qad-data", default=None, help="self | random | PATH (txt or JSONL).")
@click.option("--loss", type=click.Choice(["kl", "ce"]), default="kl", show_default=True,
              help="kl = QAD (forward KL to the teacher); ce = plain QAT.")
@click.option("--qad-mode", type=click.Choice(MODES), default=None,
              help="global = KL of the whole model (default); layer = each decoder layer trained to match its teacher "
                   "layer's output, one after another; layer+global = the first, then the second.")
@click.option("--qad-layer-fraction", type=float, default=None, help="layer+global: the layer stage's share (0.5).")
@click.option("--qad-checkpoint-every", type=int, default=None,
              help="Steps between QAD checkpoints (for --resume); default: one a minute.")
@click.option("--resume", is_flag=True, help="Continue an interrupted QAD run from its last checkpoint.")
def convert(model, out, scheme, targets, calib_data, calib_tokens, exclude, scale_search, rounding, smooth_alpha,
            expert_calibration, layerwise, dry_run, seed, device, dtype, force, trust_remote_code, no_eval, qad_steps, qad_lr, qad_scale_lr,
            qad_batch, qad_seq_len, qad_budget_minutes, qad_data, loss, qad_mode, qad_layer_fraction,
            qad_checkpoint_every, resume) -> None:
    """Quantize MODEL (HF folder or .gguf; default: embedded SmolLM2-135M-Instruct) to NVFP4 and export it."""
    started = time.monotonic()
    scale_search = scale_search or _default_scale_search(qad_steps, qad_scale_lr)
    try:
        quant = QuantConfig(scheme=scheme, exclude=exclude, scale_search=scale_search, rounding=rounding,
                            smooth_alpha=_default_smooth_alpha(scheme, qad_steps) if smooth_alpha is None else smooth_alpha,
                            expert_calibration=expert_calibration)
    except ValueError as error:
        raise UserError(str(error)) from error
    cfg = ConvertConfig(out=out, source=model, quant=quant, targets=_targets(targets), calib_data=calib_data,
                        calib_tokens=calib_tokens, seed=seed, device=device, dtype=dtype, force=force,
                        trust_remote_code=trust_remote_code, evaluate=not no_eval, layerwise=layerwise, dry_run=dry_run)
    qad_options = dict(steps=qad_steps, lr=qad_lr, scale_lr=qad_scale_lr, batch=qad_batch, seq_len=qad_seq_len,
                       budget_minutes=qad_budget_minutes, data=qad_data, loss=loss, seed=seed,
                       checkpoint_every=qad_checkpoint_every, mode=qad_mode, layer_fraction=qad_layer_fraction)
    stage = _qad_stage(qad_options, resume, started)
    report = run_convert(cfg, train=stage)
    if dry_run:
        return
    click.echo(f"wrote {out}: " + ", ".join(f"{t} {report['size_vs_bf16'][t]:.2f}x BF16" for t in cfg.targets))
    if report["accuracy"]:
        click.echo(report["accuracy"]["table"])


def _default_scale_search(qad_steps: int | None, qad_scale_lr: float | None) -> str:
    """amax (ModelOpt's bytes, and those ModelOpt would write for trained weights) unless QAD learns the block
    scales anyway: then they start from mse-act, the best start measured (docs/BENCHMARKS.md)."""
    learns_scales = qad_steps != 0 and (QADConfig.scale_lr if qad_scale_lr is None else qad_scale_lr) > 0
    return "mse-act" if learns_scales else "amax"


def _default_smooth_alpha(scheme: str, qad_steps: int | None) -> float:
    """0.5 when QAD trains a W4A4 student: smoothing lowers the activations' share of its error
    (docs/BENCHMARKS.md); 0 for PTQ, which writes ModelOpt's bytes, and for weight-only."""
    return 0.5 if scheme == "nvfp4" and qad_steps != 0 else 0.0


EXPORT_RESERVE_SECONDS = 20  # the exports after QAD


def _qad_stage(options: dict, resume: bool, started: float):
    """The QAD training stage for the pipeline, or None for PTQ only (--qad-steps 0).

    A budgeted pass (no --qad-steps) ends early enough that the whole convert, from this command's
    start to the end of the report's evaluation, fits --qad-budget-minutes: the pipeline passes what
    it still does after the exports (the trained row's evaluation) as `reserve_seconds`.
    """
    from nvfp4.qad.distill import run_qad
    from nvfp4.qad.layerlocal import distill_layers, layer_hook

    if options["steps"] is not None and options["steps"] < 0:
        raise UserError(f"--qad-steps must be >= 0, got {options['steps']}")
    if options["steps"] == 0:
        return None
    try:
        qad_cfg = QADConfig(**{k: v for k, v in options.items() if v is not None})
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from error
    if qad_cfg.mode != "global" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--qad-mode {qad_cfg.mode} trains layer by layer in one process; run it without torchrun, "
                        "or use --qad-mode global across GPUs")

    def stage(student, teacher, tokenizer, workdir: Path, logdir: Path, reserve_seconds: float = 0.0,
              calibration: list | None = None) -> dict:
        deadline = started + qad_cfg.budget_minutes * 60 - EXPORT_RESERVE_SECONDS - reserve_seconds
        if qad_cfg.mode == "global":
            return run_qad(student, teacher, tokenizer, qad_cfg, workdir, logdir, resume=resume, deadline=deadline)
        budgeted = qad_cfg.steps is None
        now = time.monotonic()
        layer_deadline = deadline if qad_cfg.mode == "layer" else now + (deadline - now) * qad_cfg.layer_fraction
        layer_metrics = distill_layers(student, teacher, calibration, qad_cfg, layer_deadline if budgeted else None)
        if qad_cfg.mode == "layer":
            return {"config": qad_cfg.to_dict(), "steps": layer_metrics["steps"], "layer_local": layer_metrics}
        metrics = run_qad(student, teacher, tokenizer, qad_cfg, workdir, logdir, resume=resume, deadline=deadline)
        return {**metrics, "layer_local": layer_metrics}

    stage.batch, stage.seq_len = qad_cfg.batch, qad_cfg.seq_len  # for the memory plan
    stage.resume = resume
    stage.needs_calibration_data = qad_cfg.mode != "global"  # the layer-local stage trains on it
    stage.whole_model = qad_cfg.mode != "layer"  # layer-local alone also streams with the layer-by-layer PTQ
    if not stage.whole_model:
        budget_end = started + qad_cfg.budget_minutes * 60 - EXPORT_RESERVE_SECONDS
        stage.layer_hook = layer_hook(qad_cfg, budget_end if qad_cfg.steps is None else None)
    return stage
