"""Block-int8 tables (kernels/int8_blocks.py): exact for GGUF Q8_0 sources, None for anything else."""

import pytest
import torch

from nvfp4.kernels import int8_blocks
from support.numerics import q8_0_source, sqnr


@pytest.mark.parametrize("magnitude", [1e-3, 0.05, 30.0])
def test_q8_0_sourced_tensors_are_held_exactly(magnitude):
    weight = q8_0_source(300, 96, magnitude)
    found = int8_blocks.exact_int8_blocks(weight.float(), rows_per_chunk=128)  # several chunks
    assert found is not None
    codes, scales = found
    assert codes.dtype == torch.int8 and codes.shape == (300, 96)
    assert scales.dtype == torch.float16 and scales.shape == (300, 3)
    assert torch.equal(int8_blocks.values(codes, scales), weight.float())


def test_tensors_of_any_other_form_are_refused():
    plain_bf16 = torch.randn(64, 64).bfloat16()
    assert int8_blocks.exact_int8_blocks(plain_bf16.float()) is None
    not_bf16 = q8_0_source(64, 64).float() + 1e-9  # fp32 values that no bf16 table holds
    assert int8_blocks.exact_int8_blocks(not_bf16) is None
    assert int8_blocks.exact_int8_blocks(q8_0_source(64, 64)[:, :48].float()) is None  # 48: not a multiple of 32
    with_nan = q8_0_source(64, 64).float()
    with_nan[3, 3] = float("nan")
    assert int8_blocks.exact_int8_blocks(with_nan) is None
    mostly_q8 = q8_0_source(64, 64).float()
    mostly_q8[-1, -1] += 0.01  # one block off the form: the whole tensor stays as it was
    assert int8_blocks.exact_int8_blocks(mostly_q8) is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 40, 90], ids=lambda r: f"M{r}")
def test_linear_matches_fp32_matmul_on_the_bf16_weight(rows, monkeypatch):
    monkeypatch.setattr(int8_blocks, "ROWS_PER_CHUNK", 128)  # beyond the GEMV's rows, W is rebuilt in 3 chunks
    weight = q8_0_source(300, 576)
    codes, scales = int8_blocks.exact_int8_blocks(weight.float())
    x = torch.randn(rows, 576)
    expected = (x.double() @ weight.double().T).float()
    got = int8_blocks.linear(x, codes, scales)  # C GEMV up to 64 rows; beyond, chunks of W
    assert got.shape == expected.shape and sqnr(expected, got) > 120, f"{rows=}"


def test_linear_without_c_kernels_matches_too(monkeypatch):
    from nvfp4.kernels import cpu

    weight = q8_0_source(100, 64)
    codes, scales = int8_blocks.exact_int8_blocks(weight.float())
    x = torch.randn(3, 64)
    monkeypatch.setattr(cpu, "available", lambda: False)
    assert sqnr((x.double() @ weight.double().T).float(), int8_blocks.linear(x, codes, scales)) > 120
