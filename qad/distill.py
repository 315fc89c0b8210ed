"""The QAD pass: train the fake-quantized student to match its frozen teacher (forward KL at T=1).

Only the quantized linears' weights train (what the export keeps). The vocabulary-sized logits are
never materialised for a whole batch: the loss runs over chunks of tokens on detached hidden
states, and the body receives their gradient in one backward.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from converter.errors import UserError
from converter.quantize import quantized_modules
from qad.config import QADConfig
from qad.data import TeacherSamples, file_rows, random_rows

_STATE = "qad_state.pt"
_POOL = "qad_pool.pt"


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the quantized linears' weights."""
    student.requires_grad_(False)
    weights = [m.weight for m in quantized_modules(student).values()]
    for weight in weights:
        weight.requires_grad_(True)
    return weights


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_decoder(), model.get_output_embeddings()


def chunked_loss(hidden: Tensor, head: nn.Module, teacher_hidden: Tensor | None, teacher_head: nn.Module | None,
                 targets: Tensor | None, chunk: int) -> tuple[Tensor, Tensor]:
    """Mean per-token loss and its gradient w.r.t. `hidden` [N, H], one token chunk at a time.

    KL(teacher || student) when `teacher_hidden` is given, else next-token cross-entropy on `targets`.
    """
    hidden = hidden.detach().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    count = hidden.shape[0]
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        log_q = F.log_softmax(head(hidden[part]).float(), -1)
        if teacher_hidden is not None:
            with torch.no_grad():
                log_p = F.log_softmax(teacher_head(teacher_hidden[part]).float(), -1)
            loss = (log_p.exp() * (log_p - log_q)).sum() / count
        else:
            loss = F.nll_loss(log_q, targets[part], reduction="sum") / count
        loss.backward()
        total += loss.detach()
    return total, hidden.grad


def train_step(student: nn.Module, teacher: nn.Module, batch: Tensor, cfg: QADConfig) -> float:
    """Forward both models, backward the chunked loss through the student; returns the loss."""
    body, head = _body_and_head(student)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if batch.is_cuda else torch.autocast("cpu", enabled=False)
    with autocast:
        hidden = body(input_ids=batch).last_hidden_state
        hidden_flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        if cfg.loss == "kl":
            with torch.no_grad():
                teacher_hidden = teacher.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]
            loss, grad = chunked_loss(hidden_flat, head, teacher_hidden.reshape(hidden_flat.shape),
                                      teacher.get_output_embeddings(), None, cfg.kl_chunk_tokens)
        else:
            loss, grad = chunked_loss(hidden_flat, head, None, None, batch[:, 1:].reshape(-1), cfg.kl_chunk_tokens)
    hidden_flat.backward(grad)
    return loss.item()


def lr_at(step: int, total: int, cfg: QADConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_fraction of the peak."""
    warmup = max(1, round(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Plan:
    """How many steps, over which rows of the data pool, in which order (all fixed before step 0)."""

    def __init__(self, pool: Tensor, total_steps: int, cfg: QADConfig):
        self.pool, self.total, self.cfg = pool, total_steps, cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        needed = total_steps * cfg.batch
        order = []
        while len(order) < needed:
            order += torch.randperm(pool.shape[0], generator=generator).tolist()
        self.order = order[:needed]

    def batch(self, step: int) -> Tensor:
        return self.pool[self.order[step * self.cfg.batch : (step + 1) * self.cfg.batch]]


def _data_pool(student, teacher, tokenizer, cfg: QADConfig, rows_needed: int | None, deadline: float | None,
               step_seconds: float | None) -> Tensor:
    """Rows [n, seq_len] to train on; for `self`, sampled until enough rows or the budget is spent."""
    vocab = teacher.config.vocab_size
    if cfg.data == "random":
        return random_rows(vocab, rows_needed, cfg.seq_len, cfg.seed)
    if cfg.data != "self":
        return file_rows(Path(cfg.data), tokenizer, cfg.seq_len)
    sampler = TeacherSamples(teacher, tokenizer, cfg.seq_len, cfg.seed)
    pool, started = [], time.monotonic()
    with tqdm(desc="QAD data: teacher samples", unit="row", total=rows_needed) as bar:
        while rows_needed is None or sum(len(p) for p in pool) < rows_needed:
            pool.append(sampler.rows())
            bar.update(len(pool[-1]))
            if rows_needed is None:  # budgeted: stop when sampling more would leave too few steps
                rows = sum(len(p) for p in pool)
                per_row = (time.monotonic() - started) / rows
                steps_affordable = (deadline - time.monotonic()) / (step_seconds + per_row * cfg.batch / cfg.reuse)
                if rows * cfg.reuse >= steps_affordable * cfg.batch:
                    break
    return torch.cat(pool)[: rows_needed] if rows_needed else torch.cat(pool)


def _probe_step_seconds(student, teacher, cfg: QADConfig, device) -> float:
    """Time one forward/backward at the training shape (its gradients are discarded)."""
    batch = random_rows(teacher.config.vocab_size, cfg.batch, cfg.seq_len, cfg.seed).to(device)
    start = time.monotonic()
    train_step(student, teacher, batch, cfg)
    student.zero_grad(set_to_none=True)
    return time.monotonic() - start


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _plot(losses: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([l["step"] for l in losses], [l["loss"] for l in losses], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)" if losses and losses[0]["loss_kind"] == "kl" else "cross-entropy")
    ax.set_title("QAD training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_qad(student: nn.Module, teacher: nn.Module, tokenizer, cfg: QADConfig, workdir: Path, log_dir: Path,
            resume: bool = False, deadline: float | None = None) -> dict:
    """Train `student` in place; checkpoints in `workdir` (for resume), loss.png + log.jsonl in `log_dir`.

    `deadline` (time.monotonic) bounds a budgeted run (cfg.steps None): data sampling plus training.
    """
    max_len = getattr(teacher.config, "max_position_embeddings", None)
    if max_len is not None and cfg.seq_len > max_len:
        raise UserError(f"--qad-seq-len {cfg.seq_len} is longer than the model's context ({max_len})")
    workdir, log_dir = Path(workdir), Path(log_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout: the student must match its own inference behaviour
    params = trainable_parameters(student)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state_file, pool_file = workdir / _STATE, workdir / _POOL
    started = time.monotonic()
    if resume and state_file.is_file() and pool_file.is_file():
        state = torch.load(state_file, weights_only=True)
        pool, total, first_step, losses = torch.load(pool_file, weights_only=True), state["total"], state["step"], state["losses"]
        with torch.no_grad():
            for param, saved in zip(params, state["weights"]):
                param.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
    else:
        pool, total = _plan_pool(student, teacher, tokenizer, cfg, deadline, device)
        first_step, losses = 0, []
        torch.save(pool, pool_file)
    plan = _Plan(pool, total, cfg)
    log_file = log_dir / "log.jsonl"
    tokens_per_step = cfg.batch * (cfg.seq_len - 1)
    with open(log_file, "a" if first_step else "w") as log, tqdm(total=total, initial=first_step, desc=f"QAD ({cfg.loss})", unit="step") as bar:
        for step in range(first_step, total):
            tick = time.monotonic()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss = train_step(student, teacher, plan.batch(step).to(device), cfg)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            seconds = time.monotonic() - tick
            record = {"step": step, "loss": loss, "loss_kind": cfg.loss, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_step / seconds, 1)}
            losses.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                _save_atomically({"step": step + 1, "total": total, "losses": losses, "optimizer": optimizer.state_dict(),
                                  "weights": [p.detach().clone() for p in params], "config": cfg.to_dict()}, state_file)
    student.requires_grad_(False)
    if losses:
        _plot(losses, log_dir / "loss.png")
    return {
        "config": cfg.to_dict(),
        "steps": total,
        "pool_rows": int(pool.shape[0]),
        "tokens_trained": total * tokens_per_step,
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }


def _plan_pool(student, teacher, tokenizer, cfg: QADConfig, deadline: float | None, device) -> tuple[Tensor, int]:
    """(data pool, number of steps): fixed by --qad-steps, or by what the budget allows."""
    if cfg.steps is not None:
        rows = math.ceil(cfg.steps * cfg.batch / cfg.reuse)
        return _data_pool(student, teacher, tokenizer, cfg, rows, None, None), cfg.steps
    deadline = deadline if deadline is not None else time.monotonic() + cfg.budget_minutes * 60
    step_seconds = _probe_step_seconds(student, teacher, cfg, device)
    if cfg.data == "self":
        pool = _data_pool(student, teacher, tokenizer, cfg, None, deadline, step_seconds)
        return pool, max(1, int((deadline - time.monotonic()) / step_seconds))
    total = max(1, int((deadline - time.monotonic()) / step_seconds))
    return _data_pool(student, teacher, tokenizer, cfg, total * cfg.batch, None, None), total
