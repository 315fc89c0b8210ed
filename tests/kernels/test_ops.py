"""The torch custom ops (torch.ops.nvfp4.*): schemas and fake implementations that torch.compile traces through,
the decode attention kernel against its torch form, and row-for-row batch invariance of the decode kernels."""

import pytest
import torch

from nvfp4.kernels import int8_blocks
from nvfp4.kernels import numerics as nv
from nvfp4.kernels.attention import decode_attention, decode_attention_torch
from nvfp4.kernels.ops import fake_quantize, linear_bf16_weight, linear_w4a16, quantize
from support.numerics import q8_0_source


def _packed(rows: int = 48, cols: int = 96):
    return nv.quantize_ref(torch.randn(rows, cols))


def _attention_inputs(
    batch: int = 3, heads: int = 6, kv_heads: int = 2, slots: int = 5, max_len: int = 40, dim: int = 32
):
    torch.manual_seed(0)
    caches = torch.randn(slots, kv_heads, max_len, dim), torch.randn(slots, kv_heads, max_len, dim)
    new = torch.randn(batch, heads, dim), torch.randn(batch, kv_heads, dim), torch.randn(batch, kv_heads, dim)
    where = torch.tensor([4, 0, 2][:batch]), torch.tensor([10, 0, 39][:batch])  # slot, position: first, last, middle
    return new, caches, where


def test_every_op_passes_torch_opcheck():
    packed, scales, gscale = _packed()
    x = torch.randn(3, 96)
    codes, block_scales = int8_blocks.exact_int8_blocks(q8_0_source(64, 96).float())
    (q, k, v), (k_cache, v_cache), (slots, positions) = _attention_inputs()
    cases = [
        (torch.ops.nvfp4.quantize, (x, gscale, None)),
        (torch.ops.nvfp4.quantize, (x, gscale, nv.block_scales(x, gscale))),
        (torch.ops.nvfp4.fake_quantize, (x, gscale, None)),
        (torch.ops.nvfp4.linear_w4a16, (x, packed, scales, gscale)),
        (torch.ops.nvfp4.linear_int8_blocks, (x, codes, block_scales)),
        (torch.ops.nvfp4.linear_bf16_weight, (x, torch.randn(64, 96).bfloat16())),
        (torch.ops.nvfp4.decode_attention, (q, k, v, k_cache, v_cache, slots, positions, 0.125)),
    ]
    for op, args in cases:  # opcheck's schema test cannot compare float8 tensors: those ops get the fake test only
        float8 = op is torch.ops.nvfp4.quantize or any(getattr(a, "dtype", None) == torch.float8_e4m3fn for a in args)
        tests = ("test_faketensor",) if float8 else ("test_schema", "test_faketensor")
        torch.library.opcheck(op, args, test_utils=tests)


def test_compile_traces_through_the_ops_without_graph_breaks():
    packed, scales, gscale = _packed()
    weight = torch.randn(48, 96).bfloat16()

    def step(x: torch.Tensor) -> torch.Tensor:
        y = linear_w4a16(x, packed, scales, gscale) + linear_bf16_weight(x, weight)
        codes, _, _ = quantize(fake_quantize(x, gscale), gscale)
        return y + codes.float().sum()

    x = torch.randn(4, 96)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    assert torch.equal(compiled(x), step(x))


@pytest.mark.parametrize("shape", [(3, 6, 2, 32), (2, 9, 3, 64), (3, 4, 4, 40)], ids=["gqa", "smollm", "mha-tail"])
def test_decode_attention_kernel_matches_torch(shape):
    batch, heads, kv_heads, dim = shape
    (q, k, v), caches, (slots, positions) = _attention_inputs(batch, heads, kv_heads, dim=dim)
    theirs = tuple(c.clone() for c in caches)
    got = decode_attention(q, k, v, *caches, slots, positions, 0.2)
    expected = decode_attention_torch(q, k, v, *theirs, slots, positions, 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(caches, theirs))  # the new keys and values written alike
    assert torch.equal(caches[0][slots, :, positions], k)


def test_decode_rows_are_computed_the_same_whatever_the_batch():
    """A sequence's decode row gets the same bits alone and beside up to 15 others (GEMV and attention)."""
    packed, scales, gscale = _packed(64, 576)
    x = torch.randn(16, 576)
    alone = torch.cat([linear_w4a16(row[None], packed, scales, gscale) for row in x])
    for batch in range(2, 17):
        assert torch.equal(linear_w4a16(x[:batch], packed, scales, gscale), alone[:batch]), batch
    (q, k, v), caches, (slots, positions) = _attention_inputs()
    together = decode_attention(q, k, v, *caches, slots, positions, 0.2)
    for b in range(len(q)):
        one = decode_attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], *caches, slots[b : b + 1], positions[b : b + 1], 0.2
        )
        assert torch.equal(one[0], together[b])
