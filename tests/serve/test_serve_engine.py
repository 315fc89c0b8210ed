"""The native engine without HTTP: continuous batching, greedy parity with transformers, stop strings."""

import asyncio
import copy
import os

import pytest
import torch

from nvfp4.serve.interface import ContextTooLong, EngineStats, GenerationRequest, QueueFull, SamplingParams
from nvfp4.serve.native import NativeEngine
from nvfp4.serve.native.detokenize import TextStream
from support.serve import check_parity, generate_tokens, load_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("packed", [True, False], ids=["student", "teacher"])
def test_continuous_batching_matches_transformers(tiny_model_dir, packed):
    model, tokenizer = load_tiny(tiny_model_dir, packed)
    prompts = [tokenizer.encode(t) for t in ["Hi", "A much longer prompt " * 8, "Tell me a story about a cat", "x y z"]]
    # 3 slots for 4 requests: one waits and joins when a slot frees; chunk 16 splits the long prompt
    check_parity(model, tokenizer, prompts, n=20, max_num_seqs=3, prefill_chunk=16)


def test_queue_and_context_limits(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir, packed=True)

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=1, max_queue=0, max_model_len=64)
        await engine.start()
        try:
            with pytest.raises(ContextTooLong):
                engine.generate(GenerationRequest("a", [5] * 60, SamplingParams(max_tokens=10)))
            running = engine.generate(GenerationRequest("b", [5], SamplingParams(max_tokens=40, ignore_eos=True)))
            with pytest.raises(QueueFull):  # the single slot is taken and no queue is allowed
                engine.generate(GenerationRequest("c", [5], SamplingParams(max_tokens=1)))
            assert len([e async for e in running]) == 40
        finally:
            await engine.close()

    asyncio.run(run())


class _CharTokenizer:
    """One character per token: makes token boundaries explicit."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_held_back_across_tokens():
    stream = TextStream(_CharTokenizer(), [ord(c) for c in "p"], SamplingParams(stop=("END", "XY")))
    deltas = [stream.add(ord(c)) for c in "abcEN"]
    assert "".join(d for d, _ in deltas) == "abc"  # "EN" held back: it may start "END"
    assert not any(hit for _, hit in deltas)
    delta, hit = stream.add(ord("D"))
    assert hit and delta == ""
    other = TextStream(_CharTokenizer(), [], SamplingParams(stop=("END",)))
    text = "".join(other.add(ord(c))[0] for c in "aEN") + other.flush()
    assert text == "aEN"  # released at the end when no stop string completed


@pytest.mark.slow
def test_default_model_greedy_matches_transformers(default_model_dir):
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.serve.native.loader import pack_model

    teacher, tokenizer, _ = load_causal_lm(default_model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompts = [tokenizer.encode(chat, add_special_tokens=False), tokenizer.encode("The three primary colours are")]
    check_parity(teacher, tokenizer, prompts, n=16)
    student, _, _ = load_causal_lm(default_model_dir)
    check_parity(pack_model(student), tokenizer, prompts, n=16)


def test_cli_reports_bad_output_folder(tmp_path):
    from click.testing import CliRunner

    from nvfp4.cli import cli

    missing = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a convert output folder" in missing.output
    empty = CliRunner().invoke(cli, ["serve", str(tmp_path), "--teacher", "none"])
    assert empty.exit_code == 2 and "no student checkpoint" in empty.output


def test_model_facts_come_from_the_convert_report(tiny_model_dir, tmp_path):
    """/v1/models's `nvfp4` card: the scheme, checkpoint bytes and held-out KL that `convert` reported."""
    import json

    from click.testing import CliRunner

    from nvfp4.cli import cli
    from nvfp4.serve.native.loader import report_facts

    out = tmp_path / "out"
    done = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--qad-steps",
            "0",
            "--targets",
            "trtllm,llamacpp",
            "--calib-data",
            "random",
            "--calib-tokens",
            "64",
        ],
    )
    assert done.exit_code == 0, done.output
    report = json.loads((out / "report.json").read_text())
    facts = report_facts(out, None, "llamacpp")
    assert facts["student"] == {
        "scheme": "nvfp4",
        "weight_bytes": report["sizes_bytes"]["llamacpp"],
        "heldout_kl": report["accuracy"]["results"]["NVFP4"]["chat_kl"],
    }
    assert facts["student"]["heldout_kl"] > 0 and facts["teacher"]["heldout_kl"] == 0.0
    assert facts["teacher"]["weight_bytes"] == report["sizes_bytes"]["bf16"]
    assert set(report_facts(out, "some/other/teacher", "trtllm")) == {"student"}  # not the report's teacher
    assert report_facts(tmp_path / "nowhere", None, "trtllm") == {}


def test_student_shares_the_teachers_unquantized_tensors(tiny_model_dir):
    from nvfp4.serve.native.loader import SharedTensors, weight_bytes

    shared = SharedTensors()
    teacher, tokenizer = shared.loader(lambda: load_tiny(tiny_model_dir, packed=False))()
    student, _ = shared.loader(lambda: load_tiny(tiny_model_dir, packed=True))()
    reference, _ = load_tiny(tiny_model_dir, packed=True)
    embed = student.get_input_embeddings().weight
    assert embed.data_ptr() == teacher.get_input_embeddings().weight.data_ptr()
    assert student.model.norm.weight.data_ptr() == teacher.model.norm.weight.data_ptr()
    embed_bytes = embed.numel() * embed.element_size()
    assert weight_bytes(student, beside=teacher) <= weight_bytes(reference) - embed_bytes
    assert weight_bytes(student) <= weight_bytes(reference)  # (the tiny model's all-ones norms merge too)
    ids = torch.tensor([tokenizer.encode("Tell me a story")])
    with torch.no_grad():  # sharing changes no number
        assert torch.equal(student(ids).logits, reference(ids).logits)
    other, _ = load_tiny(tiny_model_dir, packed=False)
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    shared.adopt(other)  # different bytes are never merged
    assert other.model.norm.weight.data_ptr() != teacher.model.norm.weight.data_ptr()
    assert other.get_input_embeddings().weight.data_ptr() == embed.data_ptr()


def test_vocab_held_in_bf16_halves_its_bytes_and_keeps_greedy_output(tiny_model_dir):
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.kernels.linear import BF16HeldEmbedding, BF16HeldLinear
    from nvfp4.serve.native.loader import hold_vocab_compact, pack_model, weight_bytes

    model, tokenizer, _ = load_causal_lm(tiny_model_dir)
    reference = pack_model(copy.deepcopy(model))
    held = hold_vocab_compact(pack_model(model))
    assert isinstance(held.get_input_embeddings(), BF16HeldEmbedding)
    assert isinstance(held.get_output_embeddings(), BF16HeldLinear)
    assert held.get_output_embeddings().weight is held.get_input_embeddings().weight  # still tied
    vocab_bytes = reference.get_input_embeddings().weight.numel() * 2
    assert weight_bytes(held) == weight_bytes(reference) - vocab_bytes
    ids = torch.tensor([tokenizer.encode("Tell me a story about a cat")])
    with torch.no_grad():
        for rows in (ids[:, :1], ids):  # one row (the C GEMV) and several
            a, b = held(rows).logits, reference(rows).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    prompts = [tokenizer.encode(t) for t in ["Hi", "Tell me a story about a cat"]]
    check_parity(held, tokenizer, prompts, n=12)  # the engine on it = transformers' generate on it
    # fp32 values that are not bf16 numbers would change: such a model keeps its fp32 tensors
    assert isinstance(hold_vocab_compact(_fp32_with_noise(tiny_model_dir)).get_input_embeddings(), torch.nn.Embedding)


def test_q8_0_sourced_vocab_is_held_as_block_int8_with_the_same_output(tiny_model_dir):
    """A vocabulary converted from a GGUF Q8_0 tensor (the embedded default model's) is held as its
    int8 codes and fp16 scales: 8.5 of bf16's 16 bits a value, the same logits and greedy output."""
    from nvfp4.converter.models import load_causal_lm
    from nvfp4.kernels.linear import Int8BlockEmbedding, Int8BlockLinear
    from nvfp4.serve.native.loader import hold_vocab_compact, pack_model, weight_bytes
    from support.numerics import q8_0_source

    model, tokenizer, _ = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table.copy_(q8_0_source(*table.shape, magnitude=float(table.std())).float())
    reference = pack_model(copy.deepcopy(model))
    held = hold_vocab_compact(pack_model(model))
    embed, head = held.get_input_embeddings(), held.get_output_embeddings()
    assert isinstance(embed, Int8BlockEmbedding) and isinstance(head, Int8BlockLinear)
    assert head.codes is embed.codes and head.scales is embed.scales  # still tied
    vocab, hidden = table.shape
    assert (
        weight_bytes(held) == weight_bytes(reference) - vocab * hidden * 4 + vocab * hidden + vocab * hidden // 32 * 2
    )
    ids = torch.tensor([tokenizer.encode("Tell me a story about a cat")])
    with torch.no_grad():
        assert torch.equal(embed(ids), reference.get_input_embeddings()(ids))  # the lookup is exact
        for rows in (ids[:, :1], ids):
            torch.testing.assert_close(held(rows).logits, reference(rows).logits, rtol=0, atol=1e-5)
    prompts = [tokenizer.encode(t) for t in ["Hi", "Tell me a story about a cat"]]
    check_parity(held, tokenizer, prompts, n=12)


def _fp32_with_noise(model_dir):
    from nvfp4.converter.models import load_causal_lm

    model = load_causal_lm(model_dir)[0]
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1e-7 * torch.randn_like(model.get_input_embeddings().weight))
    return model


def test_near_zero_temperature_and_penalty_are_greedy_and_finite(tiny_model_dir):
    """temperature=1e-40 and repetition_penalty=1e-300 once overflowed the sampler and aborted every running
    sequence; now the first is greedy and the second is clamped."""
    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    ids = tokenizer.encode("Tell me a story")

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=4)
        await engine.start()
        try:
            return await asyncio.gather(
                generate_tokens(engine, ids, 12),
                generate_tokens(engine, ids, 12, temperature=1e-40),
                generate_tokens(engine, ids, 12, repetition_penalty=1e-300),
            )
        finally:
            await engine.close()

    greedy, tiny_temperature, tiny_penalty = asyncio.run(run())
    assert tiny_temperature == greedy and len(tiny_penalty[0]) == 12
    assert SamplingParams(temperature=1e-40).temperature == 0.0
    assert SamplingParams(repetition_penalty=1e-300).repetition_penalty == 1e-2


def test_a_failing_request_ends_alone_while_the_batch_goes_on(tiny_model_dir, monkeypatch):
    from nvfp4.serve.native import engine as native

    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    real_sample = native.sample

    def sample(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("sampler broke")
        return real_sample(logits, params, generators)

    monkeypatch.setattr(native, "sample", sample)
    ids = tokenizer.encode("Hello there")

    async def events(engine, **params):
        request = GenerationRequest("r", ids, SamplingParams(max_tokens=10, temperature=0, min_tokens=10, **params))
        return [event async for event in engine.generate(request)]

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=4)
        await engine.start()
        try:
            return await asyncio.gather(events(engine), events(engine, seed=666), events(engine))
        finally:
            await engine.close()

    good, bad, other = asyncio.run(run())
    assert [e.finish_reason for e in bad] == ["error"] and "sampler broke" in bad[0].error
    assert len(good) == 10 and good[-1].finish_reason == "length"
    assert [e.token_id for e in other] == [e.token_id for e in good]


def test_closing_a_request_that_never_started_takes_it_out_of_the_queue(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir, packed=True)

    async def run():
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=1, max_queue=4)
        await engine.start()
        try:
            busy = engine.generate(GenerationRequest("busy", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True)))
            first = await anext(busy)
            queued = [engine.generate(GenerationRequest(f"q{i}", [5], SamplingParams(max_tokens=5))) for i in range(3)]
            for stream in queued:  # closed before iterating: an async generator would skip its cleanup
                await stream.aclose()
            await busy.aclose()
            for _ in range(100):
                if engine.stats() == EngineStats():
                    break
                await asyncio.sleep(0.02)
            return first, engine.stats()
        finally:
            await engine.close()

    first, stats = asyncio.run(run())
    assert first.token_id is not None and stats.running == 0 and stats.waiting == 0


def test_a_request_gets_the_same_tokens_alone_and_in_any_batch(tiny_model_dir, monkeypatch):
    """Prompts joining a batch of decoding sequences (steps that mix prompt rows and decode rows, short and
    long prompts) give token for token what each gives alone: decode rows always take the packed GEMV,
    prompt rows the matrix path. The model's logits are coarsened so that a one-ulp change of path flips
    near-ties within a few tokens (a random tiny model otherwise hides it)."""
    from nvfp4.serve.native import model as native_model
    from nvfp4.serve.native.loader import hold_vocab_compact

    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    model = hold_vocab_compact(model)  # as load_student holds it: the head read by a C GEMV
    real_logits = native_model.BatchedCausalLM._logits
    monkeypatch.setattr(
        native_model.BatchedCausalLM,
        "_logits",
        lambda self, hidden, chunks: (lambda logits, spans: (logits * 1e4 % 7.0, spans))(
            *real_logits(self, hidden, chunks)
        ),
    )
    prompts = [tokenizer.encode(t) for t in ["Hi", "A longer prompt that goes on " * 3, "x y", "Tell me about cats"]]

    async def run(together: bool):
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=4)
        await engine.start()
        try:
            if together:
                return await asyncio.gather(
                    *(generate_tokens(engine, p, 24, delay=0.03 * i) for i, p in enumerate(prompts))
                )
            return [await generate_tokens(engine, p, 24) for p in prompts]
        finally:
            await engine.close()

    alone, together = asyncio.run(run(False)), asyncio.run(run(True))
    assert [t for t, _ in together] == [t for t, _ in alone]


def test_presence_and_frequency_penalties_follow_openai():
    from nvfp4.serve.native.sampling import apply_penalties

    logits = torch.zeros(6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), params, history=[1, 2, 2, 3], banned=[], generated=[2, 2, 3])
    # token 2 generated twice: 0.25 x 2 + 0.5; token 3 once: 0.25 + 0.5; token 1 only in the prompt: untouched
    assert out.tolist() == [0.0, 0.0, -1.0, -0.75, 0.0, 0.0]


def test_compiled_decode_gives_the_eager_tokens(tiny_model_dir):
    """--compile: the decode step under torch.compile (graphs for one and several sequences, built at warm-up)."""
    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    prompts = [tokenizer.encode(t) for t in ["Hi", "Tell me a story about a cat", "x y z"]]

    async def run(compile: bool):
        engine = NativeEngine("m", lambda: (model, tokenizer), max_num_seqs=4, compile=compile)
        await engine.start()
        try:
            return await asyncio.gather(
                *(generate_tokens(engine, p, 12, delay=0.02 * i) for i, p in enumerate(prompts))
            )
        finally:
            await engine.close()

    eager, compiled = asyncio.run(run(False)), asyncio.run(run(True))
    assert [t for t, _ in compiled] == [t for t, _ in eager]


def test_the_engine_thread_loads_its_model(tiny_model_dir):
    """All of a model's torch work in one thread: a loader thread's OpenMP pool would stay beside the engine's and
    oversubscribe the cores (decode measured 1.6x slower)."""
    import threading

    model, tokenizer = load_tiny(tiny_model_dir, packed=True)
    loaded_in = []

    def load():
        loaded_in.append(threading.current_thread().name)
        return model, tokenizer

    async def run():
        engine = NativeEngine("m", load)
        await engine.start()
        await engine.close()
        return engine._thread.name

    assert loaded_in == [asyncio.run(run())]


def test_fused_projections_are_views_of_one_matrix(tiny_model_dir):
    from nvfp4.serve.native.model import fuse_linears

    model, _ = load_tiny(tiny_model_dir, packed=True)
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, parts[0].in_features)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_linears(parts)
    for part in parts:  # no second copy of the weights
        assert part.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
    assert torch.equal(fused(x), expected)  # rows of one GEMV: each row summed as alone
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), expected)
    teacher, _ = load_tiny(tiny_model_dir, packed=False)
    assert fuse_linears([teacher.model.layers[0].mlp.gate_proj, teacher.model.layers[0].mlp.up_proj]) is None


def test_batched_sampler_rules():
    from nvfp4.serve.native.sampling import make_generator, sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_p=1e-6),
        SamplingParams(temperature=1.0),
    ]
    assert sample(logits, params, [None] * 4)[:3] == greedy[:3]  # top-k 1 and a tiny top-p leave the best token alone
    # a seeded row draws the same token alone and in any batch
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[3:], [seeded], [make_generator(7)])[0] for _ in range(3)]
    together = sample(logits, [*params[:3], seeded], [None, None, None, make_generator(7)])[3]
    assert alone == [together] * 3
    # frequencies follow softmax(logits / T) within the nucleus; nothing outside it
    row = torch.tensor([2.0, 1.0, 0.0, -5.0])
    draws = sample(
        row.expand(4000, 4).clone(), [SamplingParams(temperature=1.0, top_p=0.9)] * 4000, [make_generator(1)] * 4000
    )
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / 4000
    probs = torch.softmax(row, -1)
    kept = probs[:2] / probs[:2].sum()  # 0.665 + 0.245 reach 0.9: the nucleus is the first two
    assert counts[2:].sum() == 0 and torch.allclose(counts[:2], kept, atol=0.03)
