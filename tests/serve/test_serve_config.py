"""ServeConfig: bad values are UserErrors naming the field; `nvfp4 serve` words them as the flags that set them."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvfp4.cli import cli
from nvfp4.errors import UserError
from nvfp4.serve.adapters.base import ProxyEngine
from nvfp4.serve.cli import SERVE_FLAGS, config_from_flags, serve
from nvfp4.serve.config import AdapterSettings, NativeSettings, ServeConfig
from nvfp4.serve.interface import EngineStartError
from nvfp4.serve.limits import Limits


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        (dict(api_key=" "), "api_key", "is empty"),
        (dict(host="0.0.0.0"), "api_key", "without a key"),
        (dict(host="0.0.0.0", published_on="192.168.1.5"), "api_key", "without a key"),
        (dict(port=70000), "port", "in [0, 65535]"),
        (dict(engine="sglang"), "engine", "choose one of native, vllm, trtllm, llamacpp"),
        (dict(threads=0), "threads", ">= 1"),
        (dict(max_model_len=8), "max_model_len", ">= 16"),
        (dict(log_level="loud"), "log_level", "choose one of"),
        (dict(limits=Limits(max_queue=-1)), "limits.max_queue", ">= 0"),
        (dict(limits=Limits(max_num_seqs=2048)), "limits.max_num_seqs", "in [1, 1024]"),
        (dict(native=NativeSettings(device="tpu")), "native.device", "choose one of cpu, cuda"),
        (dict(adapter=AdapterSettings(ready_timeout=0)), "adapter.ready_timeout", ">= 1"),
        (dict(adapter=AdapterSettings(args=("--n_ctx", "8"))), "adapter.args", "not native"),
        (dict(engine="vllm", native=NativeSettings(device="cuda")), "native.device", "places its models itself"),
    ],
)
def test_a_bad_value_is_a_user_error_naming_its_field(tmp_path, kwargs, field, fragment):
    with pytest.raises(UserError) as raised:
        ServeConfig(tmp_path, **kwargs)
    assert raised.value.field == field and f"`{field}`" in str(raised.value) and fragment in str(raised.value)


def test_a_good_config_keeps_its_values_and_hides_the_key(tmp_path):
    config = ServeConfig(
        str(tmp_path),
        host="0.0.0.0",
        api_key="sesame",
        engine="llamacpp",
        adapter=AdapterSettings(args=["--n_batch", "64"]),
    )
    assert config.out == tmp_path and config.adapter.args == ("--n_batch", "64")
    assert "sesame" not in repr(config)


def test_every_field_has_a_flag():
    """Each leaf of ServeConfig (the settings groups expanded) is worded as a flag in errors."""
    groups = {"limits": Limits, "native": NativeSettings, "adapter": AdapterSettings}
    leaves = set()
    for field in dataclasses.fields(ServeConfig):
        inner = dataclasses.fields(groups[field.name]) if field.name in groups else ()
        leaves |= {f"{field.name}.{f.name}" for f in inner} if inner else {field.name}
    assert leaves == set(SERVE_FLAGS)


def test_the_command_defaults_are_the_config_defaults(monkeypatch):
    monkeypatch.delenv("NVFP4_API_KEY", raising=False)
    monkeypatch.delenv("NVFP4_PUBLISHED_ON", raising=False)
    with serve.make_context("serve", ["some/out"]) as ctx:
        assert config_from_flags(ctx.params) == ServeConfig(Path("some/out"))


@pytest.mark.parametrize(
    "args, line",
    [
        (["--api-key", ""], "error: --api-key (or NVFP4_API_KEY) is empty"),
        (["--host", "0.0.0.0"], "set --api-key (or NVFP4_API_KEY), or bind 127.0.0.1"),
        (
            ["--", "--n_ctx", "8"],
            "error: arguments after `--` (--n_ctx 8) go to engine vllm, trtllm or llamacpp, not native",
        ),
        (
            ["--engine", "vllm", "--device", "cuda"],
            "error: --device is the native engine's; engine vllm places its models",
        ),
    ],
)
def test_the_cli_words_the_field_as_its_flag(tmp_path, args, line):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), *args], env={"NVFP4_API_KEY": None})
    assert result.exit_code == 2 and line in result.output, result.output
    assert "`api_key`" not in result.output and "`native.device`" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_an_engine_process_that_dies_before_it_is_ready_is_an_engine_start_error():
    """Serve's own exception type (still a RuntimeError), so callers tell a failed start from a bug."""

    class Dies(ProxyEngine):
        kind = "dies"

        def command(self, port: int) -> list[str]:
            return [self.executable, "-c", "raise SystemExit(3)"]

    engine = Dies("student", "m", None, 64, ready_timeout=60)
    assert engine.executable == sys.executable  # the base's default: a Python

    async def start():
        try:
            await engine.start()
        finally:
            await engine.close()

    with pytest.raises(EngineStartError, match="dies exited with code 3 before it was ready") as raised:
        asyncio.run(start())
    assert isinstance(raised.value, RuntimeError)


def test_ui_without_the_nvfp4_command_is_refused_before_the_models_load(tmp_path):
    """`serve` alone (not through the `nvfp4` group) has no page to mount: the error names the flag, and comes
    before any checkpoint is looked for (tmp_path has none)."""
    result = CliRunner().invoke(serve, [str(tmp_path), "--ui"], env={"NVFP4_API_KEY": None})
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith("--ui is mounted by the `nvfp4` command"), result.exception
