"""`nvfp4 ui` follows serve's key rule (serve/config.py check_key): no key, no page on another interface."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nvfp4.cli import cli


class Launched(Exception):
    """Raised where the page would start serving: the command got past its checks."""


@pytest.fixture()
def no_launch(monkeypatch):
    import nvfp4.ui.app

    def build_ui(*args, **kwargs):
        raise Launched()

    monkeypatch.setattr(nvfp4.ui.app, "build_ui", build_ui)


@pytest.mark.parametrize(
    "args, env",
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "192.168.1.5"], {}),
        (["--host", "0.0.0.0", "--published-on", "10.0.0.2"], {}),
        (["--host", "0.0.0.0"], {"NVFP4_PUBLISHED_ON": "192.168.1.5"}),
    ],
)
def test_the_page_refuses_another_interface_without_a_key(no_launch, args, env):
    result = CliRunner().invoke(cli, ["ui", *args], env={"NVFP4_API_KEY": None, "NVFP4_PUBLISHED_ON": None, **env})
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "without a key" in result.output and "--api-key (or NVFP4_API_KEY)" in result.output, result.output
    assert "`api_key`" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, env",
    [
        ([], {}),
        (["--host", "0.0.0.0", "--api-key", "sesame"], {}),
        (["--host", "0.0.0.0"], {"NVFP4_PUBLISHED_ON": "127.0.0.1"}),  # a container published on loopback
    ],
)
def test_the_page_starts_on_loopback_or_with_a_key(no_launch, args, env):
    result = CliRunner().invoke(cli, ["ui", *args], env={"NVFP4_API_KEY": None, "NVFP4_PUBLISHED_ON": None, **env})
    assert isinstance(result.exception, Launched), (result.exit_code, result.output)


def test_an_empty_key_is_refused(no_launch):
    result = CliRunner().invoke(cli, ["ui", "--api-key", " "], env={"NVFP4_API_KEY": None})
    assert result.exit_code == 2 and "--api-key (or NVFP4_API_KEY) is empty" in result.output, result.output
