"""`nvfp4 serve --no-prefix-caching` (and vLLM's --enable-prefix-caching/--no-enable-prefix-caching spelling) reaches
the native engines through ServeConfig (issue 38 B)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nvfp4.converter.layout import student_folder
from nvfp4.serve.cli import config_from_flags, native_engines, serve
from nvfp4.serve.config import NativeSettings, ServeConfig


@pytest.mark.parametrize(
    "flags, enabled",
    [
        ([], True),
        (["--no-prefix-caching"], False),
        (["--no-enable-prefix-caching"], False),
        (["--enable-prefix-caching"], True),
        (["--no-prefix-caching", "--prefix-caching"], True),  # the last one wins, as click's flags do
    ],
)
def test_the_flag_and_vllms_spelling_set_the_config(monkeypatch, flags, enabled):
    monkeypatch.delenv("NVFP4_API_KEY", raising=False)
    monkeypatch.delenv("NVFP4_PUBLISHED_ON", raising=False)
    with serve.make_context("serve", ["some/out", *flags]) as ctx:
        config = config_from_flags(ctx.params)
    assert config.native.prefix_caching is enabled
    assert config == ServeConfig(Path("some/out"), native=NativeSettings(prefix_caching=enabled))


def test_the_help_names_both_spellings():
    text = serve.get_help(serve.make_context("serve", ["out"]))
    assert "--no-prefix-caching" in text and "--no-enable-prefix-caching" in text


@pytest.mark.parametrize("enabled", [True, False])
def test_native_engines_get_the_setting(tmp_path, tiny_model_dir, enabled):
    out = tmp_path / "out"
    student_folder(out).mkdir(parents=True)
    shutil.copy(Path(tiny_model_dir) / "config.json", student_folder(out) / "config.json")
    config = ServeConfig(out, teacher="none", native=NativeSettings(prefix_caching=enabled))
    engines = native_engines(config)
    assert list(engines) == ["student"] and engines["student"].prefix_caching is enabled
