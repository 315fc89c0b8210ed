"""QAD: STE training of the fake-quantized student against its teacher (KL at T=1), data, resume."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nvfp4.converter import evaluate as evaluate_module
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import quantize, quantized_modules
from nvfp4.errors import UserError
from nvfp4.kernels import numerics as nv
from nvfp4.qad import distill
from nvfp4.qad.config import QADConfig
from nvfp4.qad.data import TeacherSamples, file_rows, random_rows
from nvfp4.qad.distill import chunked_loss, run_qad, trainable_parameters, update


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """A tiny teacher with confident predictions (weights scaled up) and its NVFP4 student."""
    teacher, tokenizer, _ = load_causal_lm(tiny_model_dir)
    return confident(teacher), tokenizer


def confident(teacher):
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "norm" not in name:
                param.mul_(8.0)
    return teacher


def fresh_student(teacher, scheme="nvfp4-a16"):
    return quantize(copy.deepcopy(teacher), QuantConfig(scheme=scheme))


def held_out_kl(teacher, student, ids) -> float:
    with torch.no_grad():
        log_p = F.log_softmax(teacher(ids).logits, -1)
        log_q = F.log_softmax(student(ids).logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@pytest.mark.parametrize("learn_scales", [False, True], ids=["weights", "weights+scales"])
def test_only_what_the_export_keeps_trains(models, learn_scales):
    teacher, _ = models
    student = fresh_student(teacher)
    params = trainable_parameters(student, learn_scales)
    modules = quantized_modules(student).values()
    expected = [m.weight for m in modules] + ([m.log_block_scales for m in modules] if learn_scales else [])
    assert {id(p) for p in params} == {id(p) for p in expected} and len(params) == len(expected)
    assert {id(p) for p in student.parameters() if p.requires_grad} == {id(p) for p in params}
    assert all(not p.requires_grad for n, p in student.named_parameters() if "embed" in n or "norm" in n)


def test_learned_scales_train_and_are_what_the_export_stores(models, tmp_path):
    teacher, tokenizer = models
    cfg = QADConfig(steps=12, lr=3e-4, scale_lr=1e-2, batch=2, seq_len=16, data="random", reuse=6)
    pool = random_rows(teacher.config.vocab_size, 4, 16, cfg.seed)
    student = fresh_student(teacher)
    before = held_out_kl(teacher, student, pool)
    run_qad(student, teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l")
    assert held_out_kl(teacher, student, pool) < 0.7 * before  # (0.47 measured; weights alone reach 0.35 here)
    moved = 0
    for name, module in quantized_modules(student).items():
        assert module.log_block_scales is None and module.block_scales is not None, name
        assert torch.equal(module.export().scales.view(torch.uint8), module.block_scales.view(torch.uint8))
        amax_rule = nv.block_scales(module.weight, module.weight_gscale)
        moved += (module.block_scales.view(torch.uint8) != amax_rule.view(torch.uint8)).sum().item()
    assert moved > 0, "no block scale left the amax rule"


def test_chunked_kl_equals_unchunked_kl_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, teacher_hidden = torch.randn(37, 16), torch.randn(37, 16)
    loss, grad = chunked_loss(hidden, head, teacher_hidden, head, None, chunk=5)
    full_hidden = hidden.clone().requires_grad_(True)
    log_p, log_q = F.log_softmax(head(teacher_hidden), -1), F.log_softmax(head(full_hidden), -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, full_hidden.grad, rtol=1e-5, atol=1e-7)


def _adamw_steps(gradient_norms: list[float], step) -> list[torch.Tensor]:
    """Two parameter groups (weights at lr, scales at 10 lr) through AdamW steps whose gradients have the
    given weight-gradient norms; `step(optimizer)` applies one step."""
    torch.manual_seed(0)
    weights, scales = [torch.randn(64, 32), torch.randn(48)], [torch.randn(64, 2)]
    params = [torch.nn.Parameter(t.clone()) for t in weights + scales]
    optimizer = torch.optim.AdamW(
        [{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}],
        lr=1e-3,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        fused=True,
    )
    for norm in gradient_norms:
        grads = [torch.randn_like(p) for p in params]
        total = torch.cat([g.flatten() for g in grads[:2]]).norm()
        for p, g in zip(params, grads):
            p.grad = g * norm / total if p is not params[2] else g
        step(optimizer)
    return [p.detach() for p in params]


def test_update_clips_the_weights_gradient_norm_like_clip_grad_norm():
    cfg = QADConfig(grad_clip=1.0)
    norms = [10.0, 0.3, 4.0, 0.8]  # clipped, not, clipped, not: Adam's moments remember the difference

    def reference(optimizer):
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.grad_clip)
        optimizer.step()

    ours, expected = _adamw_steps(norms, lambda opt: update(opt, cfg)), _adamw_steps(norms, reference)
    unclipped = _adamw_steps(norms, lambda opt: opt.step())
    for a, b, c in zip(ours, expected, unclipped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(ours, unclipped))  # the clipping mattered


def test_chunked_ce_equals_cross_entropy():
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    loss, _ = chunked_loss(hidden, head, None, None, targets, chunk=4)
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden), targets).detach(), rtol=1e-5, atol=1e-6)


def train(models, tmp_path, loss: str):
    """12 steps on a 4-row random pool (each row seen 6 times); returns (student, KL before, KL after, log)."""
    teacher, tokenizer = models
    cfg = QADConfig(steps=12, lr=3e-4, batch=2, seq_len=16, data="random", loss=loss, reuse=6, checkpoint_every=100)
    pool = random_rows(teacher.config.vocab_size, 4, 16, cfg.seed)  # the rows run_qad trains on
    student = fresh_student(teacher)
    before = held_out_kl(teacher, student, pool)
    metrics = run_qad(student, teacher, tokenizer, cfg, tmp_path / loss / "work", tmp_path / loss / "log")
    log = [json.loads(line) for line in (tmp_path / loss / "log" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and metrics["steps"] == 12 and metrics["pool_rows"] == 4
    assert (tmp_path / loss / "log" / "loss.png").stat().st_size > 1000
    return before, held_out_kl(teacher, student, pool), log


def test_qad_lowers_kl_and_beats_qat_on_the_same_data(models, tmp_path):
    before, qad_after, qad_log = train(models, tmp_path, "kl")
    assert qad_after < 0.5 * before, f"KL {before:.4f} -> {qad_after:.4f}"
    assert sum(r["loss"] for r in qad_log[-3:]) < sum(r["loss"] for r in qad_log[:3])
    _, qat_after, qat_log = train(models, tmp_path, "ce")
    assert sum(r["loss"] for r in qat_log[-3:]) < sum(r["loss"] for r in qat_log[:3]), "QAT's own loss must fall"
    assert qad_after < qat_after, f"QAD {qad_after:.4f} should beat QAT {qat_after:.4f}"


@pytest.mark.parametrize(
    "latest, scale_lr",
    [("whole", 0.0), ("lost", 0.0), ("corrupt", 0.0), ("whole", 1e-2)],
    ids=["checkpoint", "killed-while-saving", "corrupt-latest", "learned-scales"],
)
def test_resume_after_interruption_matches_uninterrupted_run(models, tmp_path, monkeypatch, latest, scale_lr):
    teacher, tokenizer = models
    cfg = QADConfig(steps=6, lr=1e-3, scale_lr=scale_lr, batch=2, seq_len=16, data="random", checkpoint_every=2)
    straight = fresh_student(teacher)
    run_qad(straight, teacher, tokenizer, cfg, tmp_path / "a", tmp_path / "a-log")

    interrupted = fresh_student(teacher)
    real_step, calls = distill.train_step, []

    def crash_at_step_five(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(distill, "train_step", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        run_qad(interrupted, teacher, tokenizer, cfg, tmp_path / "b", tmp_path / "b-log")
    monkeypatch.setattr(distill, "train_step", real_step)
    if latest == "lost":  # a kill -9 between setting the last checkpoint aside and writing the new one
        (tmp_path / "b" / "qad_state.rank0.pt").unlink()
    if latest == "corrupt":  # a torn write or a bad disk: the previous checkpoint takes over
        (tmp_path / "b" / "qad_state.rank0.pt").write_bytes(b"\x00garbage" * 100)
    resumed = fresh_student(teacher)  # a new process starts from the PTQ student again
    run_qad(resumed, teacher, tokenizer, cfg, tmp_path / "b", tmp_path / "b-log", resume=True)
    for (name, a), b in zip(quantized_modules(straight).items(), quantized_modules(resumed).values()):
        assert torch.equal(a.weight, b.weight), name
        assert (a.block_scales is None) == (scale_lr == 0) and (b.block_scales is None) == (scale_lr == 0), name
        if scale_lr:
            assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8)), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b-log" / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]


def test_w4a4_student_trains_with_activation_quantization(models, tmp_path):
    from nvfp4.converter.quantize import calibrate

    teacher, tokenizer = models
    student = fresh_student(teacher, "nvfp4")
    calibrate(student, [torch.randint(0, 2000, (1, 32))], QuantConfig(scheme="nvfp4"))
    assert all(m.input_gscale is not None for m in quantized_modules(student).values())
    metrics = run_qad(
        student,
        teacher,
        tokenizer,
        QADConfig(steps=2, batch=2, seq_len=16, data="random"),
        tmp_path / "w",
        tmp_path / "l",
    )
    assert metrics["last_loss"] > 0


def test_self_data_is_teacher_chat(models):
    teacher, tokenizer = models
    rows = TeacherSamples(teacher, tokenizer, seq_len=24, seed=0, batch=3).rows()
    assert rows.shape[1] == 24 and rows.shape[0] >= 3
    text = tokenizer.decode(rows.flatten())
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text


def test_file_data_text_and_jsonl(models, tmp_path):
    _, tokenizer = models
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert file_rows(text, tokenizer, 16).shape[1] == 16
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}]}
        )
        + "\n"
        + json.dumps({"text": "plain text line " * 10})
        + "\n"
    )
    rows = file_rows(jsonl, tokenizer, 8)
    assert "<|im_start|>assistant" in tokenizer.decode(rows.flatten())


@pytest.mark.parametrize(
    "content,fragment", [("", "empty"), ("{not json}\n", "not valid JSON"), ('{"x": 1}\n', "`text`")]
)
def test_bad_data_files(models, tmp_path, content, fragment):
    _, tokenizer = models
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        file_rows(path, tokenizer, 8)


def test_bad_config_values():
    with pytest.raises(UserError, match="`qad.steps` must be >= 0") as caught:
        QADConfig(steps=-1)
    assert caught.value.field == "qad.steps"
    with pytest.raises(UserError, match="`qad.loss`"):
        QADConfig(loss="mse")
    with pytest.raises(UserError, match="`qad.scale_lr` must be >= 0"):
        QADConfig(scale_lr=-1e-3)


def test_sequence_longer_than_context_is_rejected(models, tmp_path):
    teacher, tokenizer = models
    with pytest.raises(UserError, match="longer than the model's context"):
        run_qad(
            fresh_student(teacher),
            teacher,
            tokenizer,
            QADConfig(steps=1, seq_len=100_000),
            tmp_path / "w",
            tmp_path / "l",
        )


def test_schedule_never_steps_back_after_a_slow_step(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(distill.time, "monotonic", lambda: clock[0])
    schedule = distill._Schedule(total=100, deadline=110.0)  # a 10 s window
    assert schedule.at_step(0, None) == pytest.approx(0.01)  # the planned 0.1 s step
    clock[0] += 0.1
    after_slow = schedule.at_step(1, 2.0)  # the recent steps looked slow: ends at 2.1 s of 10
    clock[0] += 0.1
    assert schedule.at_step(2, 0.1) == after_slow  # 0.3 s of 10 measured, but the LR does not go back
    clock[0] = 105.0
    assert schedule.at_step(3, 0.1) == pytest.approx(0.51)
    clock[0] = 109.95
    assert schedule.at_step(4, 0.1) is None  # would end past the deadline


def _lrs(path: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("probe_seconds", [None, 1e-4, 60.0], ids=["warm-probe", "optimistic", "pessimistic"])
def test_budgeted_run_spends_its_window_and_ends_its_cosine(models, tmp_path, monkeypatch, probe_seconds):
    """The LR follows the share of the window spent, so a probe that plans far too many or too few steps
    neither cuts the cosine short nor ends the run before the deadline."""
    teacher, tokenizer = models
    cfg = QADConfig(budget_minutes=0.1, lr=1e-3, batch=2, seq_len=16, data="random", checkpoint_every=1000)
    if probe_seconds is not None:
        monkeypatch.setattr(distill, "_probe_step_seconds", lambda *args: probe_seconds)
    start = time.monotonic()
    metrics = run_qad(fresh_student(teacher), teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l")
    elapsed = time.monotonic() - start
    assert 6 * 0.9 < elapsed < 6 + 3, elapsed  # 0.1 minutes: used, and not overrun by more than a (slow) step
    assert metrics["steps"] > 20 and metrics["tokens_trained"] == metrics["steps"] * 2 * 15
    records = [json.loads(line) for line in (tmp_path / "l" / "log.jsonl").read_text().splitlines()]
    lrs, seconds = [r["lr"] for r in records], [r["seconds"] for r in records]
    assert len(lrs) == metrics["steps"]
    peak = lrs.index(max(lrs))
    warmup_share = sum(seconds[: peak + 1]) / sum(seconds)  # of the time: one slow early step may take a tenth
    assert 0.9 * cfg.lr < lrs[peak] <= cfg.lr and 0.03 < warmup_share < 0.25  # warmup: the first ~10%
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] < 0.12 * cfg.lr  # the cosine reached its floor (0.1) at the deadline


@pytest.mark.parametrize("data", ["random", "self"])
def test_a_budget_spent_before_training_trains_nothing(models, tmp_path, capsys, data):
    """On a machine slow enough that loading, calibration and evaluation use the whole budget, QAD takes
    no step (it once took one with a negative learning rate from a negative window) and samples nothing."""
    teacher, tokenizer = models
    student = fresh_student(teacher)
    before = {n: p.clone() for n, p in student.state_dict().items()}
    cfg = QADConfig(budget_minutes=1, batch=2, seq_len=16, data=data)
    metrics = run_qad(student, teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l", deadline=time.monotonic() - 1)
    assert metrics["steps"] == 0 and metrics["pool_rows"] == 0
    assert all(torch.equal(before[n], p) for n, p in student.state_dict().items() if n in before)
    assert "no step trained" in "".join(capsys.readouterr())


def test_lr_schedule_shape():
    cfg = QADConfig(lr=1.0, warmup_fraction=0.1, min_lr_fraction=0.1)
    assert distill.lr_at(0.05, cfg) == pytest.approx(0.5)
    assert distill.lr_at(0.1, cfg) == pytest.approx(1.0)
    assert distill.lr_at(0.55, cfg) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert distill.lr_at(1.0, cfg) == distill.lr_at(1.5, cfg) == pytest.approx(0.1)


def test_resumed_budgeted_run_finishes_the_rest_of_its_window(models, tmp_path, monkeypatch):
    teacher, tokenizer = models
    cfg = QADConfig(budget_minutes=0.1, lr=1e-3, batch=2, seq_len=16, data="random", checkpoint_every=5)
    real_step, calls = distill.train_step, []

    def crash_after_a_while(*args):
        calls.append(1)
        if len(calls) > 3 and time.monotonic() - started > 3:  # half the 6 s window (3 steps were the probe)
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(distill, "train_step", crash_after_a_while)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_qad(fresh_student(teacher), teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l")
    monkeypatch.setattr(distill, "train_step", real_step)
    saved = torch.load(tmp_path / "w" / "qad_state.rank0.pt", weights_only=True)
    assert 0.2 < saved["schedule"]["progress"] < 0.8 and saved["schedule"]["window"] == pytest.approx(6, abs=1)
    started = time.monotonic()
    run_qad(fresh_student(teacher), teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l", resume=True)
    rest = time.monotonic() - started
    expected = (1 - saved["schedule"]["progress"]) * saved["schedule"]["window"]
    assert expected * 0.8 < rest < expected + 1.5, (rest, expected)
    lrs = _lrs(tmp_path / "l" / "log.jsonl")
    assert len(lrs) > saved["step"] + 5 and lrs[-1] < 0.12 * cfg.lr


def test_resume_with_other_options_is_refused(models, tmp_path):
    teacher, tokenizer = models
    cfg = QADConfig(steps=2, batch=2, seq_len=16, data="random", checkpoint_every=1)
    run_qad(fresh_student(teacher), teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l")
    other = QADConfig(steps=2, batch=2, seq_len=16, data="random", checkpoint_every=1, lr=1e-3)
    with pytest.raises(UserError, match="other QAD options"):
        run_qad(fresh_student(teacher), teacher, tokenizer, other, tmp_path / "w", tmp_path / "l", resume=True)


def test_batched_greedy_equals_transformers_generate_per_prompt(models):
    from nvfp4.converter.calibration import chat_prompt_ids
    from nvfp4.converter.generate import generate_batch

    teacher, tokenizer = models
    prompts = chat_prompt_ids(tokenizer, ["Hi there", "What is the tallest mountain on Earth?", "Name a color."])
    eos = tokenizer.eos_token_id
    batched = generate_batch(teacher, prompts, 12, eos, eos)
    for prompt, answer in zip(prompts, batched):  # left padding and the shared cache change nothing
        alone = teacher.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )[0, len(prompt) :].tolist()
        assert answer == alone
    cold = generate_batch(teacher, prompts, 12, eos, eos, torch.Generator().manual_seed(0), temperature=1e-6)
    assert cold == batched  # sampling at a vanishing temperature is greedy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_the_tempered_distribution(temperature):
    from nvfp4.converter.generate import _next_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]]).repeat(20000, 1)
    drawn = _next_tokens(logits, torch.Generator().manual_seed(0), temperature)
    frequency = torch.bincount(drawn, minlength=logits.shape[1]).float() / len(drawn)
    expected = torch.softmax(logits[0] / temperature, -1)
    assert frequency[4] == 0  # a zero-probability token is never drawn
    assert torch.allclose(frequency, expected, atol=0.012), (frequency, expected)  # ~4 standard errors


def test_sampling_is_seeded_and_stops_at_eos(models):
    from nvfp4.converter.generate import generate_batch

    teacher, tokenizer = models
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate_batch(teacher, prompts, 10, 0, None, torch.Generator().manual_seed(1))
    assert a == generate_batch(teacher, prompts, 10, 0, None, torch.Generator().manual_seed(1))
    assert a != generate_batch(teacher, prompts, 10, 0, None, torch.Generator().manual_seed(2))
    assert [len(r) for r in a] == [10, 10]
    eos = a[0][3]  # pretend the fourth token of row 0 is EOS: row 0 ends there
    b = generate_batch(teacher, prompts, 10, 0, eos, torch.Generator().manual_seed(1))
    assert b[0] == a[0][: a[0].index(eos) + 1]


def _two_rank_worker(model_dir: str, out: str) -> None:
    """Run under torchrun: QAD of the tiny student with FSDP2 over gloo (rank 0 logs)."""
    teacher, tokenizer, _ = load_causal_lm(model_dir)
    teacher = confident(teacher)
    student = fresh_student(teacher)
    cfg = QADConfig(steps=4, lr=1e-3, batch=4, seq_len=16, data="random", checkpoint_every=2)
    run_qad(student, teacher, tokenizer, cfg, Path(out) / "work", Path(out) / "log")
    if distill.world()[0] == 0:
        torch.save(
            {n: m.weight.detach().clone() for n, m in quantized_modules(student).items()}, Path(out) / "weights.pt"
        )


def test_two_gloo_ranks_follow_the_single_process_loss_curve(tiny_model_dir, tmp_path):
    teacher, tokenizer, _ = load_causal_lm(tiny_model_dir)
    teacher = confident(teacher)
    student = fresh_student(teacher)
    cfg = QADConfig(steps=4, lr=1e-3, batch=4, seq_len=16, data="random", checkpoint_every=2)
    run_qad(student, teacher, tokenizer, cfg, tmp_path / "one" / "work", tmp_path / "one" / "log")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        str(tiny_model_dir),
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def read(d):
        return [json.loads(line)["loss"] for line in (tmp_path / d / "log" / "log.jsonl").read_text().splitlines()]

    one, two = read("one"), read("two")
    assert len(one) == len(two) == 4
    assert one[-1] < one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-6)
    weights = torch.load(tmp_path / "two" / "weights.pt")
    for name, module in quantized_modules(student).items():
        torch.testing.assert_close(weights[name], module.weight, rtol=1e-4, atol=1e-6, msg=name)
    assert sorted(p.name for p in (tmp_path / "two" / "work").glob("qad_state.rank?.pt")) == [
        "qad_state.rank0.pt",
        "qad_state.rank1.pt",
    ]


if __name__ == "__main__":  # the two-rank test's torchrun entry point
    _two_rank_worker(*sys.argv[1:3])


def _convert(tiny_model_dir, out: Path, *options: str) -> dict:
    from click.testing import CliRunner

    from nvfp4.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--scheme",
            "nvfp4-a16",
            "--targets",
            "modelopt",
            "--qad-batch",
            "2",
            "--qad-seq-len",
            "16",
            "--qad-data",
            "random",
            *options,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("loss, row", [("kl", "QAD"), ("ce", "QAT")])
def test_convert_with_training_writes_log_plot_and_the_paper_rows(tiny_model_dir, tmp_path, loss, row):
    out = tmp_path / "out"
    report = _convert(tiny_model_dir, out, "--qad-steps", "3", "--loss", loss, "--qad-scale-lr", "0")
    assert list(report["accuracy"]["results"]) == ["BF16", "PTQ", row]
    assert report["quant_config"]["scale_search"] == "amax"  # fixed scales: ModelOpt's rule
    assert report["qad"]["steps"] == 3 and report["qad"]["config"]["loss"] == loss
    assert len((out / "qad" / "log.jsonl").read_text().splitlines()) == 3
    assert (out / "qad" / "loss.png").stat().st_size > 1000
    assert f"\n{row} " in (out / "report.md").read_text()


def test_learned_scales_start_from_mse_act_and_the_report_keeps_modelopts_ptq(tiny_model_dir, tmp_path):
    """By default QAD learns the scales, so it starts from the mse-act search; the report's PTQ row stays what
    `--qad-steps 0` writes by default (amax), with QAD's start beside it."""
    ptq = _convert(tiny_model_dir, tmp_path / "ptq", "--qad-steps", "0")
    assert ptq["quant_config"]["scale_search"] == "amax"
    qad = _convert(tiny_model_dir, tmp_path / "qad", "--qad-steps", "3")
    assert qad["quant_config"]["scale_search"] == "mse-act" and qad["calibration"] is not None
    results = qad["accuracy"]["results"]
    assert list(results) == ["BF16", "PTQ", "PTQ mse-act", "QAD"]
    assert results["PTQ"] == ptq["accuracy"]["results"]["NVFP4"]
    assert results["PTQ mse-act"]["chat_kl"] != results["PTQ"]["chat_kl"]
    assert "\nPTQ mse-act " in (tmp_path / "qad" / "report.md").read_text()
    chosen = _convert(tiny_model_dir, tmp_path / "amax", "--qad-steps", "3", "--scale-search", "amax")
    assert chosen["quant_config"]["scale_search"] == "amax" and list(chosen["accuracy"]["results"]) == [
        "BF16",
        "PTQ",
        "QAD",
    ]


def test_w4a4_qad_starts_from_smoothed_weights_and_the_report_keeps_modelopts_ptq(tiny_model_dir, tmp_path):
    """A W4A4 QAD pass smooths by default (alpha 0.5); PTQ and weight-only do not. The report's PTQ row is
    calibrated on the unsmoothed model's ranges: it equals what `--qad-steps 0` writes."""
    w4a4 = ("--scheme", "nvfp4", "--calib-data", "random", "--calib-tokens", "256")
    ptq = _convert(tiny_model_dir, tmp_path / "ptq", *w4a4, "--qad-steps", "0")
    assert ptq["quant_config"]["smooth_alpha"] == 0.0
    qad = _convert(tiny_model_dir, tmp_path / "qad", *w4a4, "--qad-steps", "2")
    assert qad["quant_config"]["smooth_alpha"] == 0.5 and "smooth" in qad["timings_seconds"]
    results = qad["accuracy"]["results"]
    assert list(results) == ["BF16", "PTQ", "PTQ mse-act+smooth", "QAD"]
    assert results["PTQ"] == ptq["accuracy"]["results"]["NVFP4"]
    assert "smoothing alpha: `0.5`" in (tmp_path / "qad" / "report.md").read_text()
    assert _convert(tiny_model_dir, tmp_path / "a16", "--qad-steps", "2")["quant_config"]["smooth_alpha"] == 0.0
    off = _convert(tiny_model_dir, tmp_path / "off", *w4a4, "--qad-steps", "2", "--smooth-alpha", "0")
    assert list(off["accuracy"]["results"]) == ["BF16", "PTQ", "PTQ mse-act", "QAD"]


def test_budgeted_convert_fits_its_budget_with_the_report_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """--qad-budget-minutes bounds the whole command: training ends early enough for the exports and the
    trained row's evaluation, whose cost the untrained rows' evaluation (before training) measured."""
    from nvfp4.qad import stages as qad_stages

    monkeypatch.setattr(qad_stages, "EXPORT_RESERVE_SECONDS", 1.0)  # the tiny model exports in a blink
    evaluated = []
    real_evaluate = evaluate_module.evaluate

    def timed_evaluate(*args, **kwargs):
        began = time.monotonic()
        result = real_evaluate(*args, **kwargs)
        evaluated.append((list(result), time.monotonic() - began))
        return result

    monkeypatch.setattr(evaluate_module, "evaluate", timed_evaluate)
    began = time.monotonic()
    report = _convert(tiny_model_dir, tmp_path / "out", "--qad-budget-minutes", "0.4")  # 24 s, every stage inside
    elapsed = time.monotonic() - began
    assert [rows for rows, _ in evaluated] == [["BF16", "PTQ", "PTQ mse-act"], ["QAD"]]
    assert list(report["accuracy"]["results"]) == ["BF16", "PTQ", "PTQ mse-act", "QAD"]
    assert "evaluate untrained" in report["timings_seconds"] and report["qad"]["steps"] > 1
    assert elapsed <= 24.0 + 1.0, report["timings_seconds"]  # (one training step of slack)
    assert elapsed >= 24.0 - 1.0 - 2 * evaluated[-1][1] - 3.0, report["timings_seconds"]  # the window was spent


@pytest.mark.parametrize("seconds, saves", [(1e-9, 3), (3600.0, 1)], ids=["every-step", "only-the-last"])
def test_checkpoints_by_time_without_a_step_interval(models, tmp_path, monkeypatch, seconds, saves):
    teacher, tokenizer = models
    written = []
    monkeypatch.setattr(
        distill, "_save_atomically", lambda obj, path: written.append(obj["step"] if isinstance(obj, dict) else None)
    )
    cfg = QADConfig(steps=3, lr=1e-3, batch=2, seq_len=16, data="random", checkpoint_seconds=seconds)
    run_qad(fresh_student(teacher), teacher, tokenizer, cfg, tmp_path / "w", tmp_path / "l")
    assert [s for s in written if s is not None] == [1, 2, 3][-saves:]
