"""Automatic prefix caching in the native engine: the block pool itself, then greedy outputs and prompt log-probs
with the cache on equal to the cache off (and to transformers)."""

import asyncio
import os

import httpx
import pytest
import torch

from nvfp4.serve.interface import GenerationRequest, SamplingParams
from nvfp4.serve.native import NativeEngine
from nvfp4.serve.native.kv_cache import BLOCK_SIZE, KVCache, PrefixCache, block_hashes
from support.serve import generate_tokens, greedy_reference, load_tiny, metric, serve_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _filled_cache(slots: int = 3, max_len: int = 96) -> KVCache:
    cache = KVCache(2, slots, 2, max_len, 4)
    for tensors in (cache.k, cache.v):
        for layer in tensors:
            layer.normal_()
    return cache


def test_block_keys_name_the_whole_prefix():
    a, b = list(range(40)), list(range(40))
    b[3] = 99
    assert len(block_hashes(a)) == 40 // BLOCK_SIZE
    assert block_hashes(a) == block_hashes(a + [7])  # a partial block has no key
    assert block_hashes(a)[1] != block_hashes(b)[1]  # a changed earlier block changes every later key
    assert block_hashes(a[BLOCK_SIZE:])[0] != block_hashes(a)[1]  # same ids at another offset: another block


def test_pool_copies_blocks_into_a_later_slot():
    cache = _filled_cache()
    pool = PrefixCache(cache, num_blocks=8)
    prompt = list(range(50))
    keys = block_hashes(prompt)
    pool.store(slot=0, keys=keys, computed=50)
    assert pool.load(slot=1, keys=keys, prompt_len=50) == 48
    for tensors in (cache.k, cache.v):
        for layer in tensors:
            assert torch.equal(layer[1, :, :48], layer[0, :, :48])
    assert cache.lengths[1] == 48
    assert (pool.queries, pool.hits) == (50, 48)


def test_pool_adds_only_the_blocks_it_lacks():
    cache = _filled_cache()
    pool = PrefixCache(cache, num_blocks=8)
    keys = block_hashes(list(range(48)))
    pool.store(0, keys, computed=20)  # one full block so far
    pool.store(1, keys, computed=48)  # another slot (other values): only blocks 2 and 3 are new
    assert pool.load(2, keys, prompt_len=49) == 48
    for tensors in (cache.k, cache.v):
        for layer in tensors:
            assert torch.equal(layer[2, :, :16], layer[0, :, :16])
            assert torch.equal(layer[2, :, 16:48], layer[1, :, 16:48])
            assert not torch.equal(layer[2, :, :16], layer[1, :, :16])


def test_pool_leaves_the_last_prompt_token_to_compute():
    pool = PrefixCache(_filled_cache(), num_blocks=8)
    keys = block_hashes(list(range(48)))
    pool.store(0, keys, 48)
    assert pool.load(1, keys, 48) == 32  # all three blocks cached; the last one holds the token whose logits we need
    assert pool.load(1, block_hashes([5] * 48), 48) == 0


def test_pool_evicts_least_recent_chains_from_their_tails():
    pool = PrefixCache(_filled_cache(), num_blocks=4)
    first, second, third = (block_hashes([n] * 32) for n in (1, 2, 3))
    pool.store(0, first, 32)
    pool.store(1, second, 32)
    assert pool.load(2, first, 33) == 32  # first is now the more recent chain
    pool.store(1, third, 32)  # the pool is full: second's two blocks go
    assert pool.load(2, second, 33) == 0
    assert pool.load(2, third, 33) == 32
    assert pool.load(2, first, 33) == 32  # the most recent chain
    pool.store(0, block_hashes([4] * 48), 48)  # 3 blocks: evicts third (least recent) then first's tail
    assert pool.load(2, third, 33) == 0
    assert pool.load(2, first, 33) == 16
    assert pool.load(2, block_hashes([4] * 48), 49) == 48


async def _greedy(engine, ids, n, delay) -> tuple[list[int], list[float]]:
    """-> tokens and their log-probs (a random tiny model's greedy tokens hardly depend on its context; its
    log-probs do)."""
    await asyncio.sleep(delay)
    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, logprobs=0)
    events = [event async for event in engine.generate(GenerationRequest("g", ids, params))]
    return [e.token_id for e in events], [e.logprob for e in events]


def _run(model, tokenizer, prompts, n, prefix_caching, prefill_chunk=512, delay=0.05):
    """Staggered greedy requests on 2 slots -> (their tokens, their log-probs, the engine's stats after)."""

    async def run():
        engine = NativeEngine(
            "m", lambda: (model, tokenizer), max_num_seqs=2, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching
        )
        await engine.start()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(_greedy(engine, p, n, delay * i) for i, p in enumerate(prompts))), 300
            )
            return [tokens for tokens, _ in results], [lps for _, lps in results], engine.stats()
        finally:
            await engine.close()

    return asyncio.run(run())


def _assert_close(on: list[list[float]], off: list[list[float]]) -> None:
    """Log-probs with the cache = without, up to the last bits a different batching of the same steps may change
    (a cached block with wrong K/V moved the random tiny model's by 3e-3)."""
    for with_cache, without in zip(on, off, strict=True):
        assert with_cache == pytest.approx(without, abs=1e-4)


def _shared_system_prompt(tokenizer) -> list[list[int]]:
    system = "You are a careful assistant who answers in one short sentence and never makes things up. " * 3
    questions = ["What is the capital of France?", "Name a primary colour.", "Why is the sky blue?", "Count to three."]
    return [tokenizer.encode(system + q) for q in questions]


@pytest.mark.parametrize("packed", [True, False], ids=["student", "teacher"])
def test_shared_system_prompt_greedy_equals_cache_off(tiny_model_dir, packed):
    model, tokenizer = load_tiny(tiny_model_dir, packed)
    prompts = _shared_system_prompt(tokenizer)
    prompts.append(list(prompts[0]))  # a repeat: every full block cached
    on, on_logprobs, stats = _run(model, tokenizer, prompts, n=12, prefix_caching=True, prefill_chunk=24)
    off, off_logprobs, no_stats = _run(model, tokenizer, prompts, n=12, prefix_caching=False, prefill_chunk=24)
    assert on == off
    _assert_close(on_logprobs, off_logprobs)
    assert on == [greedy_reference(model, p, 12) for p in prompts]
    shared = len(block_hashes(prompts[0])[:2]) * BLOCK_SIZE  # the system prompt's leading blocks at least
    assert stats.prefix_cache_queries == sum(map(len, prompts)) + 2 * 4  # + the two 4-token warm-up requests
    assert stats.prefix_cache_hits >= shared * 3
    assert (no_stats.prefix_cache_queries, no_stats.prefix_cache_hits) == (0, 0)


def test_prompt_logprobs_skip_the_cache(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    prompt = _shared_system_prompt(tokenizer)[0]

    async def echo(engine) -> list:
        request = GenerationRequest("e", prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))
        return [e.prompt_logprobs async for e in engine.generate(request) if e.prompt_logprobs is not None][0]

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=2)
        await engine.start()
        try:
            await generate_tokens(engine, prompt, 2)  # fills the cache with the prompt's blocks
            before = engine.stats()
            scored = await asyncio.wait_for(echo(engine), 120)
            return before, engine.stats(), scored
        finally:
            await engine.close()

    before, after, scored = asyncio.run(run())
    assert before.prefix_cache_hits == 0 and after.prefix_cache_hits == 0  # not looked up: no logits in a cached block
    assert after.prefix_cache_queries == before.prefix_cache_queries
    assert len(scored) == len(prompt) and scored[0] == (None, [])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    expected = [logits[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert [lp for lp, _ in scored[1:]] == pytest.approx(expected, abs=2e-2)


@pytest.mark.slow
def test_default_model_shared_system_prompt_greedy_equals_cache_off(default_model_dir):
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.serve.native.loader import pack_model

    model, tokenizer, _ = load_causal_lm(default_model_dir)
    model = pack_model(model)
    system = {"role": "system", "content": "You are a geography teacher. Answer in one sentence, plainly. " * 4}
    chats = [
        [system, {"role": "user", "content": q}] for q in ("Capital of France?", "Capital of Japan?", "Longest river?")
    ]
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    on, on_logprobs, stats = _run(model, tokenizer, prompts, n=16, prefix_caching=True, prefill_chunk=32)
    off, off_logprobs, _ = _run(model, tokenizer, prompts, n=16, prefix_caching=False, prefill_chunk=32)
    assert on == off == [greedy_reference(model, p, 16) for p in prompts]
    _assert_close(on_logprobs, off_logprobs)
    assert stats.prefix_cache_hits >= 64  # a request admitted mid-prefill of another finds its blocks done so far


def test_hits_reach_prometheus_under_vllm_names(tiny_model_dir):
    prompt = "You are a careful assistant who answers in one short sentence. " * 4 + "Hi"
    with serve_tiny(tiny_model_dir) as live:
        for _ in range(2):
            body = {"model": "student", "prompt": prompt, "max_tokens": 2, "temperature": 0}
            assert httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
    queries = metric(text, "vllm:prefix_cache_queries_total", model_name="student")
    hits = metric(text, "vllm:prefix_cache_hits_total", model_name="student")
    assert queries > 2 * 40 and hits >= 32  # the second request found the first's blocks
    assert metric(text, "vllm:prefix_cache_hits_total", model_name="teacher") == 0  # the teacher saw no request
