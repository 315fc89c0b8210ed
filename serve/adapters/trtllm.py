"""`--engine trtllm`: `trtllm-serve OUT/trtllm --backend pytorch` (ModelOpt unified NVFP4 checkpoint).

TensorRT-LLM needs CUDA (NVFP4 needs Blackwell): the command line is tested here, the process only on
a GPU machine. Its OpenAI server speaks vLLM's request dialect (token-id prompts, top_k, min_tokens,
ignore_eos, stop_token_ids, stream_options), so requests are phrased as for vLLM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nvfp4.converter.layout import student_folder
from nvfp4.errors import UserError
from nvfp4.serve.adapters.vllm import VLLMEngine


def find_trtllm(trtllm_bin: str | None) -> str:
    candidate = trtllm_bin or os.environ.get("NVFP4_TRTLLM_BIN") or shutil.which("trtllm-serve")
    if not candidate:
        raise UserError(
            "--engine trtllm needs TensorRT-LLM (CUDA only): put `trtllm-serve` on PATH or pass --trtllm-bin"
        )
    path = shutil.which(candidate) or candidate
    if not Path(path).is_file():
        raise UserError(f"--trtllm-bin {candidate}: no such executable")
    return path


def student_checkpoint(out: Path) -> Path:
    folder = student_folder(out)
    if not (folder / "hf_quant_config.json").is_file():
        raise UserError(
            f"no ModelOpt checkpoint at {folder} (run `nvfp4 convert ... -o {out}` with the modelopt target)"
        )
    return folder


class TRTLLMEngine(VLLMEngine):
    kind = "trtllm"
    health_path = "/health"
    metrics_path = "/prometheus/metrics"
    stats_series: dict[str, str] = {}  # its gauge names are unverified here (no GPU): our gauges only
    structured_outputs = False  # trtllm-serve's guided decoding is a start-up option, unverified here: a 400

    @classmethod
    def for_student(cls, out: Path, name: str, opts) -> TRTLLMEngine:
        return cls.on_folder(student_checkpoint(out), name, opts)

    @classmethod
    def find_executable(cls, opts) -> str:
        return find_trtllm(opts.trtllm_bin)

    def command(self, port: int) -> list[str]:
        return [
            self.executable,
            self.model,
            "--backend",
            "pytorch",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tokenizer",
            self.model,
            "--max_seq_len",
            str(self.max_model_len),
            *self.model_args,
            *self.extra_args,
        ]
