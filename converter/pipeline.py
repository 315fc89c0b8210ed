"""One-shot convert: load -> quantize -> calibrate -> (QAD stage) -> export every target -> report.

Everything is written into a temporary sibling of OUT and renamed into place at the end, so a
failure or Ctrl-C leaves no half-written OUT.
"""

import copy
import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nvfp4.converter.calibration import calibration_batches
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.families import family_of
from nvfp4.converter.models import load_causal_lm, resolve_model
from nvfp4.converter.plan import Needs, Plan, make_plan, skeleton
from nvfp4.converter.quantize import calibrate, eligible_linears, quantize, quantized_modules
from nvfp4.converter.recipe import DTYPES, ConvertRecipe
from nvfp4.converter.report import Report
from nvfp4.converter.smoothing import smooth
from nvfp4.converter.stages import TrainingContext, TrainingStage, needs_calibration_data
from nvfp4.converter.writers import Entry, load_all_writers, packed_weights, student_entries
from nvfp4.converter.writers.hf import high_precision_modules
from nvfp4.errors import UserError

log = logging.getLogger(__name__)


def torch_device(choice: str) -> torch.device:
    """--device auto | cpu | cuda -> where convert (and QAD) compute; auto takes CUDA when there is one."""
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16  # bf16 matmul is ~70x slower on CPU


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks for reuse instead of handing them back to the OS.

    By default every activation over a few MiB is a fresh mmap that the kernel must fault in and
    zero again on the next forward (slow on VMs); the calibration forward measured ~6% faster with
    this. The process keeps its peak memory instead of shrinking after it, which a one-shot convert
    does not need. Returns False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


@dataclass(frozen=True, kw_only=True)
class ConvertConfig(ConvertRecipe):
    """A recipe and where it runs: the source, OUT, the device and the run's switches."""

    out: Path
    source: str | None = None  # None: the embedded default model
    device: str = "auto"
    force: bool = False
    trust_remote_code: bool = False
    evaluate: bool = True
    layerwise: bool = False  # PTQ one decoder layer at a time from the shards (converter/layerwise.py)
    dry_run: bool = False  # print the memory plan and stop

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown `device` {self.device}; choose auto, cpu or cuda", field="device")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("`device` cuda was asked for but no CUDA device is available", field="device")

    def recipe(self, training: dict | None = None) -> ConvertRecipe:
        """The recipe alone, with the training stage's settings."""
        return ConvertRecipe(**{f.name: getattr(self, f.name) for f in fields(ConvertRecipe)} | {"training": training})

    @property
    def torch_device(self) -> torch.device:
        return torch_device(self.device)

    @property
    def workdir(self) -> Path:
        """Survives an interrupted run (QAD checkpoints for --resume); removed after success."""
        return self.out.parent / f".{self.out.name}.work"


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("[%s]", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def _check_out(cfg: ConvertConfig) -> None:
    if cfg.out.exists() and not cfg.force:
        raise UserError(f"{cfg.out} exists; pass --force to replace it")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out} exists and is not a folder")
    if cfg.out.exists():
        check_replaceable(cfg.out, [Path(cfg.source)] if cfg.source else [])
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    for stale in cfg.out.parent.glob(f".{cfg.out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def memory_plan(cfg: "ConvertConfig", source_dir: Path, training: TrainingStage | None) -> Plan:
    """What each stage needs against what the machine has, from config.json alone (converter/plan.py)."""
    model = skeleton(source_dir)
    needs = Needs(
        cfg.quant,
        cfg.targets,
        cfg.calib_tokens,
        None if training is None else training.requirements,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        device=cfg.torch_device.type,
        evaluate=cfg.evaluate,
    )
    return make_plan(model, eligible_linears(model, cfg.quant), needs, cfg.out.parent)


def check_targets(model: torch.nn.Module, tokenizer, cfg: ConvertConfig) -> dict[str, torch.nn.Linear]:
    """Before any calibration or training: every linear is quantizable or excluded, and every requested target
    can hold the model (family, tokenizer, dimensions); -> the linears that will be quantized."""
    linears = eligible_linears(model, cfg.quant)
    if not linears:
        raise UserError("no linear layer is left to quantize: every one is excluded")
    writers = load_all_writers()
    for target in cfg.targets:
        writers[target](cfg.quant, DTYPES[cfg.dtype]).check(model, tokenizer, linears)
    family = family_of(model.config)
    if "llamacpp" in cfg.targets and not family.llamacpp_runs:
        log.warning(
            f"llama.cpp loads {family.name}'s NVFP4 GGUF but does not apply its feed-forward "
            "per-tensor scales yet (llama-cpp-python 0.3.36): OUT/llamacpp is written for when it does"
        )
    return linears


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_targets(
    student: torch.nn.Module,
    tokenizer,
    source_dir: Path,
    folder: Path,
    targets: tuple[str, ...],
    quant: QuantConfig,
    dtype: torch.dtype,
) -> dict[str, dict]:
    """Write every target into folder/<target>, all at once: most of a writer's time is file writing
    and tensor work that releases the GIL. -> {target: {"seconds": ..., "bytes": ...}}."""
    writers = load_all_writers()
    packed_weights(student)  # the packed export the writers share, computed once before they start

    def write(target: str) -> dict:
        start = time.perf_counter()
        (folder / target).mkdir()
        writers[target](quant, dtype).write(student, tokenizer, source_dir, folder / target)
        return {"seconds": round(time.perf_counter() - start, 2), "bytes": _folder_bytes(folder / target)}

    results = {}
    with ThreadPoolExecutor(len(targets)) as pool, tqdm(total=len(targets), desc="export", unit="target") as bar:
        futures = {pool.submit(write, target): target for target in targets}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return {target: results[target] for target in targets}


def check_replaceable(out: Path, sources: list[Path]) -> None:
    """--force replaces an earlier convert output (it holds report.json) or an empty folder, and never a folder
    that is, or holds, the model being converted."""
    out = out.resolve()
    for source in sources:
        source = source.resolve()
        if source == out or out in source.parents:
            raise UserError(f"--force would delete {out}, which holds the source model {source}; choose another -o")
    if any(out.iterdir()) and not (out / "report.json").is_file():
        raise UserError(
            f"{out} is not an earlier convert output (no report.json) and not empty; --force replaces "
            f"only those: choose another -o or empty it yourself"
        )


def origin(cfg: ConvertConfig, source_dir: Path) -> str:
    """What QAD checkpoints belong to: the source model (its config and weight files' names, sizes and
    times), the quantization and the calibration. A checkpoint of anything else must never be restored."""
    digest = hashlib.sha256()
    digest.update((source_dir / "config.json").read_bytes())
    for file in sorted(source_dir.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(
        json.dumps([cfg.quant.to_dict(), cfg.calib_data, cfg.calib_tokens, cfg.seed], sort_keys=True).encode()
    )
    return digest.hexdigest()


def claim_workdir(workdir: Path, fingerprint: str, resume: bool) -> None:
    """--resume only from checkpoints of the same origin; a fresh run takes the folder over."""
    stamp = workdir / "origin.sha256"
    if resume and stamp.is_file() and stamp.read_text().strip() != fingerprint:
        raise UserError(
            f"the QAD checkpoints in {workdir} belong to another model, quantization or calibration; "
            f"drop --resume (or remove {workdir})"
        )
    stamp.write_text(fingerprint)


def _replace_atomically(tmp: Path, out: Path) -> None:
    """tmp's files on disk (fsync) and its mode the umask's (mkdtemp makes it 0700: a container running as
    another user could not read OUT), then renamed into place."""
    _sync_tree(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _sync_tree(folder: Path) -> None:
    """Every file under folder, and the folders themselves, flushed to disk: a crash right after the rename
    must not leave an OUT of empty files."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def convert(cfg: ConvertConfig, training: TrainingStage | None = None) -> Report | None:
    """Run the whole conversion; returns the report (also written to OUT/report.json and report.md), or None
    for a dry run and on a torchrun rank but the first. A disk that fills up all the same (the plan checked it
    first) is one error line; nothing half-written stays."""
    try:
        return _convert(cfg, training)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise UserError(f"the disk holding {cfg.out.parent} filled up while writing: {error}") from error


def _convert(cfg: ConvertConfig, training: TrainingStage | None) -> Report | None:
    _check_out(cfg)
    load_all_writers()  # an import problem in a writer shows before any work
    torch.manual_seed(cfg.seed)
    source_dir = resolve_model(cfg.source)
    plan = memory_plan(cfg, source_dir, training)
    log.info(plan.render())
    if cfg.dry_run:
        return None
    run = _Run(cfg, source_dir, training, Timer())
    if plan.choose(cfg.layerwise) == "layerwise":
        return run.staged(_layerwise)
    if training is not None and training.requirements.whole_model:  # checkpoints of another origin never resume
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        claim_workdir(cfg.workdir, origin(cfg, source_dir), training.requirements.resume)
    keep_freed_memory()  # not when streaming: kept pages would hold the peak of every layer
    report = run.staged(_in_memory)
    shutil.rmtree(cfg.workdir, ignore_errors=True)
    return report


@dataclass
class _Run:
    """What both paths share: the settings, the source, the training stage, the stage timings."""

    cfg: ConvertConfig
    source_dir: Path
    training: TrainingStage | None
    timer: "Timer"

    def staged(self, body: Callable[["_Run", Path], Report | None]) -> Report | None:
        """`body(run, tmp)` writes the targets into a temporary sibling of OUT and returns the report; then the
        report is written and tmp renamed into place. A body returning None (a torchrun rank but the first)
        leaves no OUT."""
        cfg = self.cfg
        tmp = Path(tempfile.mkdtemp(dir=cfg.out.parent, prefix=f".{cfg.out.name}.tmp-"))
        try:
            report = body(self, tmp)
            if report is None:
                return None
            report.save(tmp)
            _replace_atomically(tmp, cfg.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return report

    def calibration(self, model: torch.nn.Module, tokenizer, data: str | None = None) -> list:
        cfg = self.cfg
        return calibration_batches(data or cfg.calib_data, model, tokenizer, cfg.calib_tokens, cfg.seed)

    def report(
        self, teacher: torch.nn.Module, stream: list[Entry], exports: dict, accuracy: dict | None, training: dict | None
    ) -> Report:
        return _report(self, teacher, stream, exports, accuracy, training)


def _in_memory(run: _Run, tmp: Path) -> Report | None:
    """Load, smooth, quantize, calibrate, train, export every target at once, evaluate."""
    cfg, timer = run.cfg, run.timer
    with timer.stage("load"):
        teacher, tokenizer, _ = load_causal_lm(
            run.source_dir, compute_dtype(cfg.torch_device), cfg.torch_device, cfg.trust_remote_code
        )
        teacher.requires_grad_(False)
    check_targets(teacher, tokenizer, cfg)
    student, batches = _post_training_quantized(run, teacher, tokenizer)
    heldout, trained = _trained(run, teacher, student, tokenizer, batches, tmp)
    if int(os.environ.get("RANK", "0")):  # under torchrun every rank trains; rank 0 alone writes OUT
        return None
    with timer.stage("export"):
        exports = export_targets(student, tokenizer, run.source_dir, tmp, cfg.targets, cfg.quant, DTYPES[cfg.dtype])
    accuracy = None
    if cfg.evaluate:
        with timer.stage("evaluate"):
            row = "NVFP4" if run.training is None else run.training.requirements.row
            accuracy = _evaluate_trained(teacher, student, tokenizer, heldout, row)
    return run.report(teacher, student_entries(student), exports, accuracy, trained)


def _post_training_quantized(run: _Run, teacher, tokenizer) -> tuple[torch.nn.Module, list | None]:
    """The student: smoothed, quantized and calibrated as the config asks; -> (student, the calibration batches
    when any stage needed them)."""
    cfg, timer = run.cfg, run.timer
    student, batches = copy.deepcopy(teacher), None
    if cfg.quant.smooth_alpha:
        with timer.stage("smooth"):
            batches = run.calibration(teacher, tokenizer)
            smooth(student, batches, cfg.quant.smooth_alpha, cfg.quant.expert_calibration == "all")
    with timer.stage("quantize"):
        student = quantize(student, cfg.quant)
    if needs_calibration_data(cfg.quant):
        with timer.stage("calibrate"):
            batches = batches or run.calibration(teacher, tokenizer)
            calibrate(student, batches, cfg.quant)
    if run.training is not None and run.training.requirements.per_layer and batches is None:
        batches = run.calibration(teacher, tokenizer)
    return student, batches


def _trained(run: _Run, teacher, student, tokenizer, batches, tmp: Path) -> tuple["_Heldout | None", dict | None]:
    """The training stage run on the student (in place), the untrained rows evaluated before it."""
    if run.training is None:
        return None, None
    cfg, timer = run.cfg, run.timer
    heldout = None
    if cfg.evaluate:  # the untrained rows now: no copy of the student is kept through training
        with timer.stage("evaluate untrained"):
            heldout = _evaluate_untrained(teacher, student, tokenizer, cfg.quant, batches)
    context = TrainingContext(
        student, teacher, tokenizer, cfg.workdir, tmp / "qad", batches, heldout.trained_row_seconds if heldout else 0.0
    )
    with timer.stage("qad"):
        return heldout, run.training.train(context)


def _layerwise(run: _Run, tmp: Path) -> Report:
    """PTQ one decoder layer at a time from the shards, every target written as the layers stream
    (converter/layerwise.py), each layer trained by the training stage's `train_layer` when there is one; the
    held-out evaluation streams beside it (prose rows)."""
    from transformers import AutoTokenizer

    from nvfp4.converter.evaluate import prose_samples
    from nvfp4.converter.layerwise import ShardedModel, export_stream, quantize_layerwise

    cfg, timer, training = run.cfg, run.timer, run.training
    with timer.stage("load"):
        source = ShardedModel(run.source_dir, compute_dtype(cfg.torch_device))
        tokenizer = AutoTokenizer.from_pretrained(run.source_dir)
    check_targets(source.model, tokenizer, cfg)
    batches = _streamed_calibration(run, source.model, tokenizer)
    stream, writers = export_stream(source, cfg.quant), []
    for target in cfg.targets:
        (tmp / target).mkdir()
        writer = load_all_writers()[target](cfg.quant, DTYPES[cfg.dtype])
        writer.begin(source.model, tokenizer, run.source_dir, tmp / target, stream)
        writers.append(writer)
    with timer.stage("quantize, calibrate, export (layer by layer)"):
        metrics = quantize_layerwise(
            source,
            cfg.quant,
            batches,
            writers,
            prose_samples(tokenizer) if cfg.evaluate else None,
            cfg.quant.expert_calibration == "all",
            training.train_layer if training is not None else None,
        )
        for writer in writers:
            writer.finish()
    exports = {target: {"seconds": None, "bytes": _folder_bytes(tmp / target)} for target in cfg.targets}
    accuracy = {"results": {"NVFP4": metrics}, "table": format_prose_table(metrics)} if metrics else None
    return run.report(source.model, stream, exports, accuracy, training.summary() if training is not None else None)


def _streamed_calibration(run: _Run, model: torch.nn.Module, tokenizer) -> list | None:
    """The calibration batches of a streamed convert: sampling the teacher's answers needs the whole model, so
    `self` takes the shipped prompts alone."""
    if not needs_calibration_data(run.cfg.quant) and run.training is None:
        return None
    data = "prompts" if run.cfg.calib_data == "self" else run.cfg.calib_data
    if data != run.cfg.calib_data:
        log.info(
            "calibration: the shipped prompts, without the teacher's answers (sampling them needs the "
            "whole model in memory; --calib-data PATH gives your own text)"
        )
    return run.calibration(model, tokenizer, data)


def format_prose_table(metrics: dict[str, float]) -> str:
    header = f"{'model':<14}{'prose KL':>10}{'prose top1':>12}{'prose PPL':>14}"
    row = f"{'NVFP4':<14}{metrics['prose_kl']:>10.4f}{metrics['prose_top1']:>12.3f}{metrics['prose_ppl']:>14.2f}"
    return "\n".join([header, "-" * len(header), row])


def _modelopt_rule_ptq(teacher, student, quant: QuantConfig, batches) -> torch.nn.Module | None:
    """When training starts from searched scales, GPTQ rounding or smoothed weights, the PTQ that
    `--qad-steps 0` writes by default (ModelOpt's amax scales, nearest rounding, no smoothing, input scales
    calibrated on the same data), to compare with."""
    modelopt_rule = replace(quant, scale_search="amax", rounding="nearest", smooth_alpha=0.0)
    if quant == modelopt_rule:
        return None
    baseline = quantize(copy.deepcopy(teacher), modelopt_rule)
    if quant.smooth_alpha and needs_calibration_data(modelopt_rule):  # smoothing changed the student's input ranges
        calibrate(baseline, batches, modelopt_rule)
    else:  # calibration ran unquantized: the ranges do not depend on scales or rounding
        for mine, theirs in zip(quantized_modules(baseline).values(), quantized_modules(student).values()):
            mine.input_gscale = theirs.input_gscale
    return baseline


def _start_name(quant: QuantConfig) -> str:
    """The report's row for QAD's starting point when it is not ModelOpt's PTQ, e.g. "PTQ mse-act+smooth"."""
    changes = [x for x in (quant.scale_search, quant.rounding) if x not in ("amax", "nearest")]
    return "PTQ " + "+".join(changes + (["smooth"] if quant.smooth_alpha else []))


@dataclass
class _Heldout:
    """The held-out evaluation around training: the set, the untrained rows' results, and what the trained
    row will cost after training (the teacher's forwards and the same-sized start row's own time)."""

    data: object  # converter.evaluate.EvalSet
    results: dict
    trained_row_seconds: float


def _evaluate_untrained(teacher, student, tokenizer, quant: QuantConfig, batches) -> _Heldout:
    """Rows before training: the teacher, PTQ (ModelOpt's rule), and QAD's start where it differs from that."""
    from nvfp4.converter.evaluate import build_eval_set, evaluate

    data = build_eval_set(teacher, tokenizer)
    modelopt_ptq = _modelopt_rule_ptq(teacher, student, quant, batches)
    start = "PTQ" if modelopt_ptq is None else _start_name(quant)
    seconds: dict[str, float] = {}
    results = evaluate(
        teacher,
        ({} if modelopt_ptq is None else {"PTQ": modelopt_ptq}) | {start: student},
        tokenizer,
        data,
        seconds=seconds,
    )
    return _Heldout(data, results, seconds["teacher"] + seconds[start])


def _evaluate_trained(teacher, student, tokenizer, heldout: _Heldout | None, name: str) -> dict:
    """The report's accuracy: the untrained rows (when training ran) and this student's row."""
    from nvfp4.converter.evaluate import evaluate, format_table

    if heldout is None:
        results = evaluate(teacher, {"NVFP4": student}, tokenizer)
    else:
        results = heldout.results | evaluate(teacher, {name: student}, tokenizer, heldout.data, teacher_name=None)
    return {"results": results, "table": format_table(results)}


def nvfp4_parameter_share(stream: list[Entry]) -> float:
    """Of the exported values (a tied head once), the share held in NVFP4."""
    numel = [(math.prod(entry.shape), entry.packed) for entry in stream]
    return sum(n for n, packed in numel if packed) / sum(n for n, _ in numel)


def _report(
    run: _Run, teacher, stream: list[Entry], exports: dict, accuracy: dict | None, training: dict | None
) -> Report:
    cfg = run.cfg
    bf16_bytes = sum(p.numel() for p in teacher.parameters()) * 2
    sizes = {target: result["bytes"] for target, result in exports.items()}
    settings = None if run.training is None else run.training.settings()
    return Report(
        source=None if cfg.source is None else str(Path(cfg.source).resolve()),
        source_dir=str(run.source_dir),
        model=teacher.config.architectures[0] if teacher.config.architectures else type(teacher).__name__,
        scheme=cfg.quant.scheme,
        quant_config=cfg.quant.to_dict(),
        nvfp4_parameter_share=round(nvfp4_parameter_share(stream), 4),
        high_precision_modules=high_precision_modules(teacher, {e.name for e in stream if e.packed}),
        targets=list(cfg.targets),
        calibration={"data": cfg.calib_data, "tokens": cfg.calib_tokens} if "calibrate" in run.timer.seconds else None,
        seed=cfg.seed,
        sizes_bytes={"bf16": bf16_bytes, **sizes},
        size_vs_bf16={t: round(b / bf16_bytes, 3) for t, b in sizes.items()},
        timings_seconds=run.timer.seconds,
        export_seconds={target: result["seconds"] for target, result in exports.items()},
        qad=training,
        accuracy=accuracy,
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "quant"},
        recipe=cfg.recipe(settings).to_dict(),
    )
