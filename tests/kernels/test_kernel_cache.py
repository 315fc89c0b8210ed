"""The compiled-kernel cache (issue 38, A6): a library is loaded only from a folder no one else can write to, and
only when its bytes match the hash recorded when it was built; anything else is rebuilt, never a traceback."""

import hashlib
import logging
import os
import shutil
import subprocess

import pytest
import torch

from nvfp4.kernels import cpu

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler")
PLANTED = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen(MARKER, "w");
    if (marker) { fputs("ran", marker); fclose(marker); }
}
"""


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A fresh $NVFP4_CACHE/kernels; the C kernels alone (no torch ops: loading a second copy registers nothing)."""
    monkeypatch.setenv("NVFP4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_TORCH_OPS", tmp_path / "no-torch-ops.cpp")
    cpu.library.cache_clear()
    yield tmp_path / "cache" / "kernels"
    cpu.library.cache_clear()


def cached_library(folder):
    return folder / f"cpu_nvfp4-{cpu.build_key(COMPILER)}.so"


def plant(folder, tmp_path, with_matching_hash: bool):
    """A library with a constructor where the cache expects the kernels; -> the file its constructor writes."""
    marker, source = tmp_path / "constructor-ran", tmp_path / "planted.c"
    source.write_text(PLANTED)
    target = cached_library(folder)
    subprocess.run([COMPILER, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(target)], check=True)
    if with_matching_hash:
        target.with_name(target.name + ".sha256").write_text(hashlib.sha256(target.read_bytes()).hexdigest())
    return marker


def load():
    """cpu.library(), or the exception it raised."""
    try:
        return cpu.library()
    except Exception as error:  # noqa: BLE001 - the unfixed cache raised several kinds
        return error


def assert_kernels_work(lib) -> None:
    assert lib is not None and not isinstance(lib, Exception), lib
    x = torch.randn(4, 32)
    packed, scales = cpu.quantize(x, torch.tensor(1.0))
    assert packed.shape == (4, 16) and scales.shape == (4, 2)


def test_a_new_build_records_its_hash_in_a_private_folder(kernels):
    assert_kernels_work(load())
    target = cached_library(kernels)
    record = target.with_name(target.name + ".sha256").read_text().strip()
    assert record == hashlib.sha256(target.read_bytes()).hexdigest()
    assert os.stat(kernels).st_mode & 0o022 == 0 and os.stat(target).st_mode & 0o022 == 0


@pytest.mark.parametrize("owner", ["group and others write", "another user"])
def test_a_library_planted_in_a_cache_others_can_write_is_never_loaded(kernels, tmp_path, owner, caplog):
    kernels.mkdir(parents=True)
    marker = plant(kernels, tmp_path, with_matching_hash=True)
    if owner == "another user":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(kernels, 12345, 12345)
    else:
        kernels.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        lib = load()
    assert not marker.exists(), "the planted library's constructor ran inside our process"
    assert_kernels_work(lib)  # built in a private folder for this process
    assert str(kernels) in caplog.text and "NVFP4_CACHE" in caplog.text
    assert b"planted" in cached_library(kernels).read_bytes(), "the shared folder is left as it is"


@pytest.mark.parametrize("hash_file", ["none", "another file's"])
def test_a_library_that_does_not_match_its_recorded_hash_is_rebuilt_not_loaded(kernels, tmp_path, hash_file):
    kernels.mkdir(parents=True, mode=0o700)
    marker = plant(kernels, tmp_path, with_matching_hash=False)
    target = cached_library(kernels)
    if hash_file != "none":
        target.with_name(target.name + ".sha256").write_text(hashlib.sha256(b"another file").hexdigest())
    lib = load()
    assert not marker.exists(), "a library without its build's hash was loaded"
    assert_kernels_work(lib)
    assert b"planted" not in target.read_bytes()


@pytest.mark.parametrize("hash_file", ["none", "of the corrupt bytes"])
def test_a_corrupt_cached_library_is_rebuilt(kernels, hash_file, caplog):
    kernels.mkdir(parents=True, mode=0o700)
    target = cached_library(kernels)
    target.write_bytes(b"\x7fELF" + b"\0" * 60)  # a build cut short: dlopen fails
    if hash_file != "none":
        target.with_name(target.name + ".sha256").write_text(hashlib.sha256(target.read_bytes()).hexdigest())
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert_kernels_work(load())
    assert target.stat().st_size > 1000 and "rebuilding" in caplog.text
