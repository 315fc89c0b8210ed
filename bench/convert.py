"""Convert benchmark: our PTQ + every registered export next to ModelOpt's mtq.quantize +
export_hf_checkpoint, in the same run, on the same calibration batches.

Prints one row per stage (seconds, ours / ModelOpt's, speed-up) and the end-to-end totals: ours with
every target (trtllm, vllm, llamacpp) and ours with trtllm only (ModelOpt's one format).

    .venv/bin/python bench/convert.py                       # default model, W4A4 (nvfp4)
    .venv/bin/python bench/convert.py --scheme nvfp4-a16 --calib-tokens 1024 --repeats 2
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from converter.calibration import calibration_batches  # noqa: E402
from converter.config import QuantConfig  # noqa: E402
from converter.models import load_causal_lm, resolve_model  # noqa: E402
from converter.quantize import calibrate, quantize  # noqa: E402
from converter.writers import load_all_writers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def run_ours(source: Path, scheme: str, batches, out: Path, dtype: torch.dtype) -> dict[str, float]:
    timer = Timer("ours")
    with timer.stage("load"):
        teacher, tokenizer, _ = load_causal_lm(source)
    with timer.stage("quantize+calibrate", total=len(batches)) as bar:
        student = quantize(teacher, QuantConfig(scheme=scheme))  # in place: PTQ needs no teacher copy
        calibrate(student, _advancing(batches, bar))
    for target, writer in load_all_writers().items():
        with timer.stage(f"export {target}"):
            (out / target).mkdir(parents=True)
            writer(QuantConfig(scheme=scheme), dtype).write(student, tokenizer, source, out / target)
    return timer.seconds


def run_modelopt(source: Path, scheme: str, batches, out: Path, dtype: torch.dtype) -> dict[str, float]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with timer.stage("export trtllm"):
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
    like_for_like = sum(v for k, v in ours.items() if k in theirs)
    lines.append(f"| end to end, trtllm only | {like_for_like:.2f} | {total_theirs:.2f} | {total_theirs / like_for_like:.2f}x |")
    total = sum(ours.values())
    lines.append(f"| end to end, all {sum(k.startswith('export') for k in ours)} targets | {total:.2f} | "
                 f"{total_theirs:.2f} | {total_theirs / total:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--scheme", choices=["nvfp4", "nvfp4-a16"], default="nvfp4")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="unquantized tensors in both exports (ModelOpt writes the model's dtype)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N per stage, sides interleaved")
    args = parser.parse_args()

    source = resolve_model(args.model)
    teacher, tokenizer, _ = load_causal_lm(source)
    batches = calibration_batches("random", teacher, tokenizer, args.calib_tokens, seed=0)
    del teacher
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            theirs.append(run_modelopt(source, args.scheme, batches, Path(scratch) / f"modelopt{repeat}", DTYPES[args.dtype]))
            ours.append(run_ours(source, args.scheme, batches, Path(scratch) / f"ours{repeat}", DTYPES[args.dtype]))
    print(f"model {source.name}, scheme {args.scheme}, {len(batches)} calibration batches of "
          f"{batches[0].shape[1]} tokens, exports in {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(render(best_of(ours), best_of(theirs)))


if __name__ == "__main__":
    main()
