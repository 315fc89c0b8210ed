"""Convert benchmark: our PTQ + every registered export next to ModelOpt's mtq.quantize +
export_hf_checkpoint, in the same run, on the same calibration batches.

Each side runs in a process of its own. Prints one row per stage (seconds, ours / ModelOpt's,
speed-up) and the end-to-end totals: ours with every target (modelopt, vllm, llamacpp, written at
once as `convert` does) and ours with modelopt only (ModelOpt's one format).

    .venv/bin/python bench/convert.py                       # default model, W4A4 (nvfp4)
    .venv/bin/python bench/convert.py --scheme nvfp4-a16 --calib-tokens 1024 --repeats 2
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nvfp4.converter.calibration import calibration_batches  # noqa: E402
from nvfp4.converter.config import QuantConfig  # noqa: E402
from nvfp4.converter.layout import TARGETS  # noqa: E402
from nvfp4.converter.models import load_causal_lm, resolve_model  # noqa: E402
from nvfp4.converter.pipeline import export_targets, keep_freed_memory  # noqa: E402
from nvfp4.converter.quantize import calibrate, quantize  # noqa: E402
from nvfp4.converter.recipe import DTYPES  # noqa: E402
from nvfp4.converter.writers import base as writers_base  # noqa: E402


class Timer:
    """Seconds per stage; each stage shows a progress bar on stderr."""

    def __init__(self, side: str):
        self.side, self.seconds = side, {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int = 1):
        bar = tqdm(total=total, desc=f"{self.side:>8} {name}", file=sys.stderr, leave=False)
        start = time.perf_counter()
        try:
            yield bar
        finally:
            self.seconds[name] = time.perf_counter() - start
            bar.update(total - bar.n)
            bar.close()


def warm_up(source: Path) -> None:
    """Process warm-up stays out of the timings on both sides: transformers imports the model's
    modelling code lazily (~2 s) and the first tokenizer load compiles its regexes (importing
    modelopt does part of this before ModelOpt's timer)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(source))]
    AutoTokenizer.from_pretrained(source)


def run_ours(source: Path, scheme: str, batches, out: Path, dtype: torch.dtype) -> dict[str, float]:
    keep_freed_memory()  # as `nvfp4 convert` does
    warm_up(source)
    timer = Timer("ours")
    with timer.stage("load"):
        teacher, tokenizer, _ = load_causal_lm(source)
    with timer.stage("quantize+calibrate", total=len(batches)) as bar:
        student = quantize(teacher, QuantConfig(scheme=scheme))  # in place: PTQ needs no teacher copy
        calibrate(student, _advancing(batches, bar))
    for name, targets in (("export modelopt", ("modelopt",)), (f"export all {len(TARGETS)}", TARGETS)):
        writers_base._EXPORTS.pop(student, None)  # each export packs the weights itself, as a convert run does
        with timer.stage(name):
            (out / name).mkdir(parents=True)
            export_targets(student, tokenizer, source, out / name, targets, QuantConfig(scheme=scheme), dtype)
    return timer.seconds


def run_modelopt(source: Path, scheme: str, batches, out: Path, dtype: torch.dtype) -> dict[str, float]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm_up(source)
    timer = Timer("modelopt")
    with timer.stage("load"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    with timer.stage("quantize+calibrate", total=len(batches)) as bar:
        config = mtq.NVFP4_DEFAULT_CFG if scheme == "nvfp4" else mtq.W4A16_NVFP4_CFG

        def forward_loop(m):
            for batch in _advancing(batches, bar):
                m(batch)

        with torch.no_grad():
            mtq.quantize(model, config, forward_loop=forward_loop)
    with timer.stage("export modelopt"):
        with torch.inference_mode():
            export_hf_checkpoint(model.to(dtype), export_dir=out / "trtllm")
        tokenizer.save_pretrained(out / "trtllm")  # ours copies tokenizer files too
    return timer.seconds


def _advancing(batches, bar):
    for batch in batches:
        yield batch
        bar.update(1)


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {stage: min(run[stage] for run in runs) for stage in runs[0]}


def render(ours: dict[str, float], theirs: dict[str, float]) -> str:
    lines = ["| stage | ours (s) | ModelOpt (s) | speed-up |", "|---|---|---|---|"]
    for stage in ours:
        if stage in theirs:
            lines.append(f"| {stage} | {ours[stage]:.2f} | {theirs[stage]:.2f} | {theirs[stage] / ours[stage]:.2f}x |")
        else:
            lines.append(f"| {stage} | {ours[stage]:.2f} | - | - |")
    total_theirs = sum(theirs.values())
    common = sum(v for k, v in ours.items() if not k.startswith("export"))
    for export in (k for k in ours if k.startswith("export")):
        total = common + ours[export]
        lines.append(
            f"| end to end, {export.removeprefix('export ')} | {total:.2f} | {total_theirs:.2f} | "
            f"**{total_theirs / total:.2f}x** |"
        )
    return "\n".join(lines)


SIDES = {"ours": run_ours, "modelopt": run_modelopt}


def run_side(side: str, source: Path, scheme: str, scratch: Path, dtype: str) -> dict[str, float]:
    """One side in a process of its own: mtq.quantize patches transformers for the rest of its process
    (our calibration forward measured ~30% slower after it ran in the same process)."""
    command = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--scratch",
        str(scratch),
        "--model",
        str(source),
        "--scheme",
        scheme,
        "--dtype",
        dtype,
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--scheme", choices=["nvfp4", "nvfp4-a16"], default="nvfp4")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="unquantized tensors in both exports (ModelOpt writes the model's dtype)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="best of N per stage, sides interleaved")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    source = resolve_model(args.model)
    if args.side:  # a child: the batches come from the parent, so both sides calibrate on the same tokens
        batches = torch.load(args.scratch / "batches.pt", weights_only=True)
        seconds = SIDES[args.side](source, args.scheme, batches, args.scratch / args.side, DTYPES[args.dtype])
        shutil.rmtree(args.scratch / args.side)
        print(json.dumps(seconds))
        return
    teacher, tokenizer, _ = load_causal_lm(source)
    batches = calibration_batches("random", teacher, tokenizer, args.calib_tokens, seed=0)
    del teacher
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        torch.save(batches, Path(scratch) / "batches.pt")
        for _ in range(args.repeats):
            theirs.append(run_side("modelopt", source, args.scheme, Path(scratch), args.dtype))
            ours.append(run_side("ours", source, args.scheme, Path(scratch), args.dtype))
    print(
        f"model {source.name}, scheme {args.scheme}, {len(batches)} calibration batches of "
        f"{batches[0].shape[1]} tokens, exports in {args.dtype}, torch threads {torch.get_num_threads()}, "
        f"best of {args.repeats}"
    )
    print(render(best_of(ours), best_of(theirs)))


if __name__ == "__main__":
    main()
