"""Crafted checkpoints and configs (issue 38, A5): every bad input is one `error:` line, exit 2, in bounded time and
memory, before anything sized by the input is allocated."""

import json
import math
import shutil
import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from nvfp4.cli import cli

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
MIB = 2**20


class TookTooLong(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    """Interrupts the main thread after `seconds` (the unfixed code ran for minutes, growing)."""

    def interrupt(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def _imported(tmp_path_factory):
    """Both commands run once on sane folders, so that tracemalloc below sees a command's work, not imports."""
    root = tmp_path_factory.mktemp("warm")
    CliRunner().invoke(cli, ["verify", str(student_out(root, safetensors_bytes({NORM: entry()}, b"\0" * 16)))])
    CliRunner().invoke(cli, ["convert", model_folder(root, LLAMA), "-o", str(root / "converted"), "--dry-run"])


def invoke(args: list[str], seconds: float = 20, max_python_bytes: int = 64 * MIB):
    """Runs the CLI under a deadline and tracemalloc; -> (result, peak bytes Python allocated)."""
    tracemalloc.start()
    try:
        with deadline(seconds):
            result = CliRunner().invoke(cli, args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_python_bytes, f"allocated {peak / MIB:.0f} MiB for a bad input"
    return result


def assert_one_error_line(result, *words: str) -> None:
    assert not isinstance(result.exception, TookTooLong), result.exception
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[-1], lines[-1]


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def student_out(tmp_path, weights: bytes, config: dict | None = None):
    """An OUT whose trtllm folder holds `weights` as its model.safetensors (what `verify` reads first)."""
    folder = tmp_path / "out" / "trtllm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA))
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder.parent


def entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


NORM = "model.norm.weight"
BAD_HEADERS = {
    # the issue's four
    "offsets far past the file": ({NORM: entry(shape=(2**28,), offsets=(0, 2**30))}, b"\0" * 16),
    "offsets [0, 2**41]": ({NORM: entry(shape=(2**39,), offsets=(0, 2**41))}, b"\0" * 16),
    "offsets [64, 0]": ({NORM: entry(offsets=(64, 0))}, b"\0" * 64),
    "shape larger than its data": ({NORM: entry(shape=(1000, 1000), offsets=(0, 16))}, b"\0" * 16),
    # and their neighbours
    "negative begin": ({NORM: entry(offsets=(-16, 0))}, b"\0" * 16),
    "offsets not two": ({NORM: entry(offsets=(0, 8, 16))}, b"\0" * 16),
    "float offsets": ({NORM: entry(offsets=(0.0, 16.0))}, b"\0" * 16),
    "bool offsets": ({NORM: {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0" * 16),
    "negative dimension": ({NORM: entry(shape=(-2, -2))}, b"\0" * 16),
    "shape not a list": ({NORM: entry(shape="4")}, b"\0" * 16),
    "unknown dtype": ({NORM: entry(dtype="F31")}, b"\0" * 16),
    "dtype not a string": ({NORM: entry(dtype=["F32"])}, b"\0" * 16),
    "entry not an object": ({NORM: [0, 16]}, b"\0" * 16),
    "header not an object": ([1, 2], b""),
    "overlapping tensors": ({NORM: entry(), "lm_head.weight": entry(offsets=(8, 24))}, b"\0" * 24),
    "metadata not an object": ({"__metadata__": "pt", NORM: entry()}, b"\0" * 16),
}


@pytest.mark.parametrize("header,data", BAD_HEADERS.values(), ids=BAD_HEADERS)
def test_a_crafted_safetensors_header_is_one_error_line(tmp_path, header, data):
    out = student_out(tmp_path, safetensors_bytes(header, data))
    assert_one_error_line(invoke(["verify", str(out)]), "model.safetensors")


RAW_FILES = {
    "header longer than the file": struct.pack("<Q", 10**6) + b"{}",
    "header of 2**63 bytes": struct.pack("<Q", 2**63) + b"{}",
    "shorter than its length field": b"\x01\x02",
    "header not JSON": struct.pack("<Q", 4) + b"{{{{",
    "header not UTF-8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    "header nested too deep": struct.pack("<Q", 200_000) + b"[" * 200_000,
}


@pytest.mark.parametrize("raw", RAW_FILES.values(), ids=RAW_FILES)
def test_a_malformed_safetensors_file_is_one_error_line(tmp_path, raw):
    assert_one_error_line(invoke(["verify", str(student_out(tmp_path, raw))]), "model.safetensors")


@pytest.mark.parametrize(
    "weight_map",
    [{NORM: "../../outside.safetensors"}, {NORM: 7}, ["model.safetensors"]],
    ids=["a file outside the folder", "not a file name", "not an object"],
)
def test_a_crafted_index_is_one_error_line(tmp_path, weight_map):
    out = student_out(tmp_path, safetensors_bytes({NORM: entry()}, b"\0" * 16))
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({NORM: entry()}, b"\0" * 16))
    (out / "trtllm" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_one_error_line(invoke(["verify", str(out)]), "model.safetensors.index.json")


def wrong_for_the_config(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    """A well-formed file of `tensors` (name -> (dtype, shape)), zeros."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F32": 4, "U8": 1, "F8_E4M3": 1}[dtype] * math.prod(shape)
        header[name] = entry(dtype, shape, (offset, offset + size))
        offset += size
    return safetensors_bytes(header, b"\0" * offset)


Q = "model.layers.0.self_attn.q_proj"
WRONG_FOR_THE_CONFIG = {  # -> (tensors, what the error names)
    "a shape that is not the config's": ({NORM: ("F32", (2, 2))}, f"{NORM} has shape (2, 2)"),
    "packed codes of the wrong shape": (
        {f"{Q}.weight": ("U8", (64, 8)), f"{Q}.weight_scale": ("F8_E4M3", (64, 4)), f"{Q}.weight_scale_2": ("F32", ())},
        f"{Q}.weight is torch.uint8 (64, 8)",
    ),
    "a global scale without its codes": ({f"{Q}.weight_scale_2": ("F32", ())}, f"{Q}.weight is missing"),
    "quantized tensors of no linear": (
        {
            "model.norm.weight_scale_2": ("F32", ()),
            "model.norm.weight": ("U8", (64, 32)),
            "model.norm.weight_scale": ("F8_E4M3", (64, 4)),
        },
        "model.norm is not a linear",
    ),
}


@pytest.mark.parametrize("tensors,named", WRONG_FOR_THE_CONFIG.values(), ids=WRONG_FOR_THE_CONFIG)
def test_tensors_that_do_not_fit_the_config_are_one_error_line(tmp_path, tensors, named):
    out = student_out(tmp_path, wrong_for_the_config(tensors))
    assert_one_error_line(invoke(["verify", str(out)]), "trtllm", named)


def test_the_issues_178_byte_file_fails_layer_by_layer_convert_before_allocating(tiny_model_dir, tmp_path):
    """convert --layerwise reads the shards with our reader; the issue's file declared 4.7 GB in 178 bytes."""
    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    embedding = "model.embed_tokens.weight"
    header = {embedding: entry(dtype="BF16", shape=(49152, 48000), offsets=(0, 49152 * 48000 * 2))}
    raw = safetensors_bytes(header)
    raw += b"\0" * (178 - len(raw))
    assert len(raw) == 178
    (source / "model.safetensors").write_bytes(raw)
    result = invoke(
        [
            "convert",
            str(source),
            "-o",
            str(tmp_path / "out"),
            "--layerwise",
            "--qad-steps",
            "0",
            "--calib-data",
            "random",
            "--calib-tokens",
            "64",
            "--targets",
            "trtllm",
        ],
        seconds=60,
    )
    assert_one_error_line(result, "model.safetensors", embedding)


def test_a_valid_checkpoint_reads_back(tmp_path):
    from nvfp4.converter.shards import Checkpoint

    header = {"__metadata__": {"format": "pt"}, "b": entry(dtype="U8", shape=(0,), offsets=(16, 16)), "a": entry()}
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, struct.pack("<4f", 1, 2, 3, 4)))
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.get("a").tolist() == [[1, 2], [3, 4]] and checkpoint.get("b").numel() == 0


# --- config.json ---------------------------------------------------------------------------------------------


def model_folder(tmp_path, config) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "model.safetensors").write_bytes(safetensors_bytes({NORM: entry()}, b"\0" * 16))
    return str(folder)


BAD_CONFIGS = {
    # the issue's four
    "num_hidden_layers 3000000": {"num_hidden_layers": 3_000_000},
    "num_attention_heads 0": {"num_attention_heads": 0},
    "hidden_size abc": {"hidden_size": "abc"},
    "model_type a list": {"model_type": ["llama"]},
    # and their neighbours
    "num_hidden_layers true": {"num_hidden_layers": True},
    "num_hidden_layers 2.5": {"num_hidden_layers": 2.5},
    "hidden_size -64": {"hidden_size": -64},
    "hidden_size 2**20": {"hidden_size": 2**20},
    "vocab_size 10**9": {"vocab_size": 10**9},
    "intermediate_size 0": {"intermediate_size": 0},
    "key/value heads not dividing the heads": {"num_key_value_heads": 3},
    "architectures not strings": {"architectures": [{"a": 1}]},
    "model_type a number": {"model_type": 7},
    "num_local_experts 10**6": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": 10**6,
        "num_experts_per_tok": 2,
    },
}


def convert_dry_run(folder: str, tmp_path):
    return invoke(["convert", folder, "-o", str(tmp_path / "out"), "--dry-run"], seconds=5)


@pytest.mark.parametrize("change", BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_a_crafted_config_fails_convert_at_once(tmp_path, change):
    started = time.monotonic()
    result = convert_dry_run(model_folder(tmp_path, {**LLAMA, **change}), tmp_path)
    assert_one_error_line(result, "config.json")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "text", ["[1, 2]", "{", " " * (20 * MIB) + json.dumps(LLAMA)], ids=["not an object", "not JSON", "20 MiB"]
)
def test_an_unreadable_config_fails_convert_at_once(tmp_path, text):
    assert_one_error_line(convert_dry_run(model_folder(tmp_path, text), tmp_path), "config.json")


def test_a_crafted_config_fails_verify_at_once(tmp_path):
    out = student_out(
        tmp_path, safetensors_bytes({NORM: entry()}, b"\0" * 16), {**LLAMA, "num_hidden_layers": 3_000_000}
    )
    assert_one_error_line(invoke(["verify", str(out)], seconds=5), "config.json", "num_hidden_layers")


def test_a_sane_config_passes_the_check(tmp_path):
    from nvfp4.converter.model_config import check_config

    check_config({**LLAMA, "num_key_value_heads": None, "head_dim": None}, tmp_path)
