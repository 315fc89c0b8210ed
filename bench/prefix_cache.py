"""Prefix caching in the native engine: TTFT of a request whose long prefix another request has just prefilled.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prefix_cache.py                 # default model, PTQ-packed student
    .venv/bin/python bench/prefix_cache.py --teacher --prefix 1500 --runs 3   # its unquantized weights

Each run takes a fresh 1,500-token prefix (a different slice of one long text): the first request (prefix + a
question) prefills all of it, the second (prefix + another question) finds its blocks cached. Both ask for one
token, alone on the engine, so TTFT is the prefill. The same second request on an engine without the cache is the
control. Prints the medians and the ratio second / first (issue 38: <= 0.2).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from nvfp4.serve.interface import GenerationRequest, SamplingParams
from nvfp4.serve.native import NativeEngine
from nvfp4.serve.native.kv_cache import block_hashes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUESTIONS = ("\nQuestion: what is this text about?", "\nQuestion: summarise it in one line.")


def _load(model_dir: str | None, teacher: bool):
    from nvfp4.converter.models import load_causal_lm, resolve_model
    from nvfp4.serve.native.loader import pack_model

    model, tokenizer, _ = load_causal_lm(resolve_model(model_dir))
    return (model if teacher else pack_model(model)), tokenizer


def _prefixes(tokenizer, length: int, runs: int) -> list[list[int]]:
    words = " ".join(f"item {i} is {'odd' if i % 2 else 'even'} and follows {i - 1};" for i in range(length * runs))
    ids = tokenizer.encode(words, add_special_tokens=False)
    return [ids[i * length : (i + 1) * length] for i in range(runs)]


async def _ttft(engine: NativeEngine, prompt: list[int]) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(GenerationRequest("bench", prompt, SamplingParams(max_tokens=1, temperature=0))):
        return time.perf_counter() - start
    raise RuntimeError("no token")


async def _measure(loaded, prefixes: list[list[int]], questions: list[list[int]], caching: bool) -> list[tuple]:
    engine = NativeEngine("bench", lambda: loaded, max_model_len=2048, prefix_caching=caching)
    await engine.start()
    try:
        pairs = [
            (await _ttft(engine, prefix + questions[0]), await _ttft(engine, prefix + questions[1]))
            for prefix in prefixes
        ]
        stats = engine.stats()
        print(
            f"  prefix caching {'on ' if caching else 'off'}: {stats.prefix_cache_hits} of "
            f"{stats.prefix_cache_queries} prompt tokens found cached"
        )
        if caching:
            _time_copy(engine, prefixes[-1] + questions[1])
        return pairs
    finally:
        await engine.close()


def _time_copy(engine: NativeEngine, prompt: list[int]) -> None:
    """The cost of a hit alone: the cached blocks' copy into a slot (the engine is idle: its thread waits)."""
    keys, pool, cache = block_hashes(prompt), engine.prefix_cache, engine.cache
    slot = cache.allocate()
    try:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            copied = pool.load(slot, keys, len(prompt))
            times.append(time.perf_counter() - start)
        size = sum(t[slot, :, :copied].nbytes for t in [*cache.k, *cache.v])
        print(
            f"  copy of {copied} cached tokens' K/V ({size / 2**20:.1f} MiB) into a slot: "
            f"{statistics.median(times) * 1000:.2f} ms"
        )
    finally:
        cache.release(slot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face folder or id (default: the embedded default model)")
    parser.add_argument("--teacher", action="store_true", help="the unquantized model instead of the packed student")
    parser.add_argument("--prefix", type=int, default=1500, help="shared prefix length in tokens")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    loaded = _load(args.model, args.teacher)
    tokenizer = loaded[1]
    prefixes = _prefixes(tokenizer, args.prefix, args.runs)
    questions = [tokenizer.encode(q, add_special_tokens=False) for q in QUESTIONS]
    print(
        f"{'teacher' if args.teacher else 'student'}, {args.prefix}-token prefix, {args.runs} runs, "
        f"{torch.get_num_threads()} torch threads"
    )
    cached = asyncio.run(_measure(loaded, prefixes, questions, caching=True))
    control = asyncio.run(_measure(loaded, prefixes, questions, caching=False))
    first = statistics.median(a for a, _ in cached)
    second = statistics.median(b for _, b in cached)
    uncached = statistics.median(b for _, b in control)
    print(f"TTFT first request (cold prefix)        {first * 1000:9.1f} ms")
    print(f"TTFT second request (prefix cached)     {second * 1000:9.1f} ms")
    print(f"TTFT second request, prefix caching off {uncached * 1000:9.1f} ms")
    print(f"ratio second / first                    {second / first:9.3f}")


if __name__ == "__main__":
    main()
