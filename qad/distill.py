"""The QAD pass: train the fake-quantized student to match its frozen teacher (forward KL at T=1).

Only what the export keeps trains: the quantized linears' weights and (by default) their block
scales. The vocabulary-sized logits are never materialised for a whole batch: the loss runs over
chunks of tokens on detached hidden states, and the body receives their gradient in one backward.

Under torchrun (WORLD_SIZE > 1) the decoder layers of student and teacher are sharded with FSDP2
and each rank trains on its slice of the global batch; a single process is the world-size-1 case.
"""

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from nvfp4.converter.quantize import quantized_modules
from nvfp4.errors import UserError
from nvfp4.kernels.kl import token_kl
from nvfp4.qad.config import QADConfig
from nvfp4.qad.data import TeacherSamples, file_rows, random_rows

log = logging.getLogger(__name__)

_POOL = "qad_pool.pt"


# ---------------------------------------------------------------- distributed (torchrun + FSDP2)


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (once); -> (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj):
    """Rank 0's value on every rank: decisions taken from the clock must agree."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_layers(model: nn.Module, device: torch.device) -> list[nn.Module]:
    """FSDP2-shard each decoder layer; embeddings, final norm and head stay whole (frozen, small)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world()[1],))
    layers = list(model.get_decoder().layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return layers


def unshard_layers(layers: list[nn.Module]) -> None:
    """Leave full weights on every rank, so export and evaluation see a plain model."""
    for layer in layers:
        layer.set_reshard_after_forward(False)
        layer.unshard()


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- loss and step


def trainable_parameters(student: nn.Module, learn_scales: bool = False) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the quantized linears' weights (and, with `learn_scales`, make
    their block scales trainable as logarithms: the export stores them as it stores any FP8 scale)."""
    student.requires_grad_(False)
    modules = quantized_modules(student).values()
    params = [m.weight for m in modules] + ([m.learn_block_scales() for m in modules] if learn_scales else [])
    for param in params:
        param.requires_grad_(True)
    return params


def chunked_loss(
    hidden: Tensor,
    head: nn.Module,
    teacher_hidden: Tensor | None,
    teacher_head: nn.Module | None,
    targets: Tensor | None,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Mean per-token loss and its gradient w.r.t. `hidden` [N, H], one token chunk at a time.

    KL(teacher || student) when `teacher_hidden` is given, else next-token cross-entropy on `targets`.
    """
    hidden = hidden.detach().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    count = hidden.shape[0]
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        logits = head(hidden[part])
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_hidden[part])
            loss = token_kl(teacher_logits, logits).sum() / count
        else:
            loss = F.cross_entropy(logits.float(), targets[part], reduction="sum") / count
        loss.backward()
        total += loss.detach()
    return total, hidden.grad


def make_optimizer(student: nn.Module, cfg: QADConfig) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """AdamW over the student's trainable tensors: the weights at cfg.lr, learned block scales (if any) at
    cfg.scale_lr. -> (optimizer, the tensors in checkpoint order: weights, then scales)."""
    trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]  # FSDP2's DTensors, if sharded
    weights = [p for name, p in trained if not name.endswith("log_block_scales")]
    scales = [p for name, p in trained if name.endswith("log_block_scales")]
    groups = [{"params": weights, "lr_ratio": 1.0}]
    if scales:
        groups.append({"params": scales, "lr_ratio": cfg.scale_lr / cfg.lr})
    # fused: one pass over param, grad and both moments (CPU: 0.03 s for the default model's 106 M weights,
    # against 0.2-0.6 s for the foreach default, which a 1 s step cannot afford)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    return optimizer, weights + scales


def update(optimizer: torch.optim.Optimizer, cfg: QADConfig) -> None:
    """Clip the weights' gradient norm to cfg.grad_clip (the scales' logarithms are on another scale) and step.

    The clipping rides in the fused AdamW pass: its `grad_scale` divides every gradient, here by
    max(1, norm / grad_clip), and the scales' (16x smaller) gradients are multiplied by the same factor
    first. That saves clip_grad_norm_'s multiply over the weights' gradients, a pass of its own.
    """
    weight_grads = [p.grad for p in optimizer.param_groups[0]["params"] if p.grad is not None]
    divisor = (torch.nn.utils.get_total_norm(weight_grads) / cfg.grad_clip).clamp(min=1.0)
    other_grads = [p.grad for group in optimizer.param_groups[1:] for p in group["params"] if p.grad is not None]
    if other_grads:
        torch._foreach_mul_(other_grads, divisor)
    optimizer.grad_scale = divisor
    optimizer.step()


def train_step(student: nn.Module, teacher: nn.Module, batch: Tensor, cfg: QADConfig) -> float:
    """Forward both models, backward the chunked loss through the student; returns the loss."""
    body, head = student.get_decoder(), student.get_output_embeddings()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if batch.is_cuda else torch.autocast("cpu", enabled=False)
    with autocast:
        hidden = body(input_ids=batch).last_hidden_state
        hidden_flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        if cfg.loss == "kl":
            with torch.no_grad():  # the teacher's logits are recomputed per chunk, never stored for the run
                teacher_hidden = teacher.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]
            loss, grad = chunked_loss(
                hidden_flat,
                head,
                teacher_hidden.reshape(hidden_flat.shape),
                teacher.get_output_embeddings(),
                None,
                cfg.kl_chunk_tokens,
            )
        else:
            loss, grad = chunked_loss(hidden_flat, head, None, None, batch[:, 1:].reshape(-1), cfg.kl_chunk_tokens)
    hidden_flat.backward(grad)
    return loss.item()


def _global_step(student: nn.Module, teacher: nn.Module, batch: Tensor, cfg: QADConfig) -> float:
    """This rank's slice of the global batch; the mean loss over all ranks (FSDP averages the gradients)."""
    rank, size = world()
    rows = batch.shape[0] // size
    loss = train_step(student, teacher, batch[rank * rows : (rank + 1) * rows], cfg)
    if size == 1:
        return loss
    total = torch.tensor(loss, dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / size


def lr_at(progress: float, cfg: QADConfig) -> float:
    """The LR of a step that ends at `progress` (0..1] of the schedule: linear warmup over the first
    warmup_fraction, then cosine decay to min_lr_fraction of the peak at 1."""
    progress = min(1.0, progress)
    if progress < cfg.warmup_fraction:
        return cfg.lr * progress / cfg.warmup_fraction
    done = (progress - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


class _Schedule:
    """How far through the run a step is, for the LR: steps done of --qad-steps, or for a budgeted run the
    share of its training window (start to deadline) spent, so that the cosine ends at the deadline
    whatever the steps turn out to cost (a probe planned 20% too many or too few steps on this noisy CPU).

    A resumed budgeted run continues at the saved share and finishes the rest of the original window."""

    def __init__(self, total: int, deadline: float | None, saved: dict | None = None):
        self.total, self.deadline = total, deadline
        self.start = time.monotonic()
        self.done = saved["progress"] if saved else 0.0
        self.last = self.done
        self.window = saved["window"] if saved else (deadline - self.start if deadline is not None else None)

    def at_step(self, step: int, recent_seconds: float | None) -> float | None:
        """The share of the schedule done when `step` (starting now) ends; for a budgeted run None instead
        where that step, taking `recent_seconds` as the last ones did, would end past the window or the
        deadline (the first step always runs, unless the window was spent before training began). Rank 0's
        answer on every rank: it comes from its clock."""
        if self.window is None:
            return (step + 1) / self.total
        if self.window <= 0:  # the stages before training spent the budget
            return _from_rank0(None)
        estimate = self.window / self.total if recent_seconds is None else recent_seconds
        now = time.monotonic()
        progress = self.done + (now + estimate - self.start) / max(self.window, 1e-9)
        if recent_seconds is None:  # a process's first step always runs
            return _from_rank0(progress)
        ends_past = progress > 1 or (self.deadline or math.inf) < now + estimate
        # never backwards (the LR stays monotone) where a slow step inflated the previous estimate
        self.last = _from_rank0(None if ends_past else max(progress, self.last))
        return self.last

    def state(self, progress: float) -> dict:
        return {"progress": progress, "window": self.window}


# ---------------------------------------------------------------- data plan


class _DataOrder:
    """Which pool rows each step trains on: one shuffle of the pool after another (fixed before step 0 by the
    seed, however many steps the budget ends up allowing); `total` is the planned (or estimated) step count."""

    def __init__(self, pool: Tensor, total_steps: int, cfg: QADConfig):
        self.pool, self.total, self.cfg = pool, total_steps, cfg
        self._generator = torch.Generator().manual_seed(cfg.seed)
        self._order: list[int] = []

    def batch(self, step: int) -> Tensor:
        end = (step + 1) * self.cfg.batch
        while len(self._order) < end:
            self._order += torch.randperm(self.pool.shape[0], generator=self._generator).tolist()
        return self.pool[self._order[step * self.cfg.batch : end]]


def _data_pool(
    teacher, tokenizer, cfg: QADConfig, rows_needed: int | None, deadline: float | None, step_seconds: float | None
) -> Tensor:
    """Rows [n, seq_len] to train on; for `self`, sampled until enough rows or the budget is spent."""
    if cfg.data == "random":
        return random_rows(teacher.config.vocab_size, rows_needed, cfg.seq_len, cfg.seed)
    if cfg.data != "self":
        return file_rows(Path(cfg.data), tokenizer, cfg.seq_len)
    sampler = TeacherSamples(teacher, tokenizer, cfg.seq_len, cfg.seed)
    pool, started = [], time.monotonic()
    with tqdm(desc="QAD data: teacher samples", unit="row", total=rows_needed, disable=world()[0] != 0) as bar:
        while rows_needed is None or sum(len(p) for p in pool) < rows_needed:
            pool.append(sampler.rows())
            bar.update(len(pool[-1]))
            if rows_needed is None and _from_rank0(_spent(pool, started, deadline, step_seconds, cfg)):
                break
    return torch.cat(pool)[:rows_needed] if rows_needed else torch.cat(pool)


def _spent(pool: list[Tensor], started: float, deadline: float, step_seconds: float, cfg: QADConfig) -> bool:
    """Budgeted sampling stops when more rows would leave too few steps to train on each `reuse` times."""
    rows = sum(len(p) for p in pool)
    per_row = (time.monotonic() - started) / rows
    steps_affordable = (deadline - time.monotonic()) / (step_seconds + per_row * cfg.batch / cfg.reuse)
    return rows * cfg.reuse >= steps_affordable * cfg.batch


def _probe_step_seconds(student, teacher, cfg: QADConfig, device) -> float:
    """Time a forward/backward at the training shape (gradients discarded), to size the data pool (the
    LR schedule follows the clock, not this estimate). The first call pays one-off warm-up costs
    (allocator, kernel builds, thread pools) several times a step and is not counted; of the next two
    the faster is kept."""
    batch = random_rows(teacher.config.vocab_size, cfg.batch, cfg.seq_len, cfg.seed).to(device)
    timings = []
    for _ in range(3):
        start = time.monotonic()
        _global_step(student, teacher, batch, cfg)
        student.zero_grad(set_to_none=True)
        timings.append(time.monotonic() - start)
    return _from_rank0(min(timings[1:]))


def _plan_pool(student, teacher, tokenizer, cfg: QADConfig, deadline: float | None, device) -> tuple[Tensor, int]:
    """(data pool, number of steps): fixed by --qad-steps, or by what the budget allows; rank 0's on all ranks."""
    if cfg.steps is not None:
        rows = math.ceil(cfg.steps * cfg.batch / cfg.reuse)
        return _from_rank0(_data_pool(teacher, tokenizer, cfg, rows, None, None)), cfg.steps
    if _from_rank0(deadline <= time.monotonic()):  # nothing to sample for: no step fits (rank 0's clock decides)
        return _from_rank0(torch.empty(0, cfg.seq_len, dtype=torch.long)), 0
    step_seconds = _probe_step_seconds(student, teacher, cfg, device)
    if cfg.data == "self":
        pool = _data_pool(teacher, tokenizer, cfg, None, deadline, step_seconds)
        return _from_rank0((pool, max(1, int((deadline - time.monotonic()) / step_seconds))))
    total = _from_rank0(max(1, int((deadline - time.monotonic()) / step_seconds)))
    return _from_rank0(_data_pool(teacher, tokenizer, cfg, total * cfg.batch, None, None)), total


# ---------------------------------------------------------------- checkpoints


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)  # a full disk is a RuntimeError from torch's stream writer, not an OSError
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the QAD checkpoint {path} (is its disk full?): {error}") from error
    os.replace(tmp, path)


def _state_files(workdir: Path, rank: int) -> tuple[Path, Path]:
    return workdir / f"qad_state.rank{rank}.pt", workdir / f"qad_state.rank{rank}.prev.pt"


def _save_checkpoint(
    workdir: Path,
    params: list[Tensor],
    optimizer,
    step: int,
    total: int,
    losses: list[dict],
    cfg: QADConfig,
    schedule: dict,
) -> None:
    """This rank's shards, optimizer state and RNG; the previous checkpoint is kept until this one lands."""
    from torch.utils._pytree import tree_map

    current, previous = _state_files(workdir, world()[0])
    state = {
        "step": step,
        "total": total,
        "schedule": schedule,
        "losses": losses,
        "world_size": world()[1],
        "config": cfg.to_dict(),
        "weights": [_local(p.detach()).clone() for p in params],
        "optimizer": tree_map(_local, optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }
    if current.exists():
        os.replace(current, previous)
    _save_atomically(state, current)


def _load_checkpoint(workdir: Path, cfg: QADConfig) -> dict | None:
    """The newest checkpoint step every rank holds (a kill -9 may land between two ranks' saves)."""
    rank, size = world()
    found = {}
    for path in _state_files(workdir, rank):
        if path.is_file():
            try:
                state = torch.load(path, weights_only=True)
            except Exception as error:  # torn or corrupt: the other file (the previous checkpoint) may be whole
                log.warning("skipping the unreadable QAD checkpoint %s: %s", path, error)
                continue
            found[state["step"]] = state
    common = set(found)
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, sorted(found))
        common = set.intersection(*(set(g) for g in gathered))
    if not common:
        return None
    state = found[max(common)]
    if state["world_size"] != size:
        raise UserError(
            f"the QAD checkpoint in {workdir} was written by {state['world_size']} ranks; resume with as many"
        )
    if state["config"] != cfg.to_dict():
        raise UserError(f"the QAD checkpoint in {workdir} was made with other QAD options; rerun them or drop --resume")
    return state


def _restore(state: dict, params: list[Tensor], optimizer) -> None:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for param, saved in zip(params, state["weights"]):
            _local(param).copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    for param in params:  # moments go back to the parameter's sharding
        if isinstance(param, DTensor):
            slot = optimizer.state[param]
            for key in ("exp_avg", "exp_avg_sq"):
                slot[key] = DTensor.from_local(slot[key], param.device_mesh, param.placements)
    torch.set_rng_state(state["rng"])


# ---------------------------------------------------------------- the pass


def _plot(losses: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([entry["step"] for entry in losses], [entry["loss"] for entry in losses], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)" if losses and losses[0]["loss_kind"] == "kl" else "cross-entropy")
    ax.set_title("QAD training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check(cfg: QADConfig, teacher: nn.Module) -> None:
    max_len = getattr(teacher.config, "max_position_embeddings", None)
    if max_len is not None and cfg.seq_len > max_len:
        raise UserError(f"--qad-seq-len {cfg.seq_len} is longer than the model's context ({max_len})")
    if cfg.batch % world()[1]:
        raise UserError(f"--qad-batch {cfg.batch} must be a multiple of the number of ranks ({world()[1]})")


def run_qad(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    cfg: QADConfig,
    workdir: Path,
    log_dir: Path,
    resume: bool = False,
    deadline: float | None = None,
) -> dict:
    """Train `student` in place; checkpoints in `workdir` (for resume), loss.png + log.jsonl in `log_dir`.

    `deadline` (time.monotonic) bounds a budgeted run (cfg.steps None): data sampling plus training.
    Under torchrun every rank calls this with the same arguments; all end with the full trained weights.
    """
    rank, size = init_distributed()
    _check(cfg, teacher)
    workdir, log_dir = Path(workdir), Path(log_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout: the student must match its own inference behaviour
    trainable_parameters(student, learn_scales=cfg.scale_lr > 0)
    sharded = shard_layers(student, device) + shard_layers(teacher, device) if size > 1 else []
    optimizer, params = make_optimizer(student, cfg)
    started = time.monotonic()
    state = _load_checkpoint(workdir, cfg) if resume else None
    if state is not None:
        _restore(state, params, optimizer)
        pool = _from_rank0(torch.load(workdir / _POOL, weights_only=True) if rank == 0 else None)
        total, first_step, losses = state["total"], state["step"], state["losses"]
    else:
        if cfg.steps is None and deadline is None:
            deadline = time.monotonic() + cfg.budget_minutes * 60
        pool, total = _plan_pool(student, teacher, tokenizer, cfg, deadline, device)
        first_step, losses = 0, []
        if rank == 0:
            _save_atomically(pool, workdir / _POOL)
    plan = _DataOrder(pool, total, cfg)
    budgeted = cfg.steps is None
    schedule = _Schedule(total, deadline if budgeted else None, state["schedule"] if state else None)
    _Loop(student, teacher, optimizer, params, plan, schedule, cfg, workdir, log_dir).run(first_step, losses)
    unshard_layers(sharded)
    for module in quantized_modules(student).values():
        module.fix_block_scales()
    student.requires_grad_(False)
    if losses and rank == 0:
        _plot(losses, log_dir / "loss.png")
    return {
        "config": cfg.to_dict(),
        "world_size": size,
        "steps": len(losses),
        "planned_steps": total,
        "pool_rows": int(pool.shape[0]),
        "tokens_trained": len(losses) * cfg.batch * (cfg.seq_len - 1),
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }


def _recent_step_seconds(losses: list[dict], last: int = 5) -> float:
    """The median of the last steps' times: one slow step (a checkpoint, this VM's hiccups) does not move it."""
    return statistics.median(r["seconds"] for r in losses[-last:])


def _checkpoint_due(step: int, last_save: float, cfg: QADConfig) -> bool:
    if cfg.checkpoint_every:
        return (step + 1) % cfg.checkpoint_every == 0
    return _from_rank0(time.monotonic() - last_save >= cfg.checkpoint_seconds)


@dataclass
class _Loop:
    """The training loop's fixed parts: models, optimizer, data plan, schedule and where it writes."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    plan: _DataOrder
    schedule: _Schedule
    cfg: QADConfig
    workdir: Path
    log_dir: Path

    def run(self, first_step: int, losses: list[dict]) -> None:
        """Steps from first_step: plan.total of them, or for a budgeted run until its schedule's window (or the
        deadline) would end inside the next step."""
        rank = world()[0]
        device = self.params[0].device
        tokens_per_step = self.cfg.batch * (self.cfg.seq_len - 1)
        budgeted = self.schedule.window is not None
        log_file = open(self.log_dir / "log.jsonl", "w") if rank == 0 else None
        if log_file:  # steps a crash logged past the checkpoint are dropped: they run again
            log_file.writelines(json.dumps(record) + "\n" for record in losses)
        bar = tqdm(
            total=self.plan.total, initial=first_step, desc=f"QAD ({self.cfg.loss})", unit="step", disable=rank != 0
        )
        last_save, step = time.monotonic(), first_step
        try:
            while budgeted or step < self.plan.total:
                tick = time.monotonic()
                progress = self.schedule.at_step(step, _recent_step_seconds(losses) if losses else None)
                if progress is None:
                    if step:
                        log.info("QAD: the budget's training window ends after %d steps", step)
                    else:
                        log.warning(
                            "QAD: the stages before training spent the budget: no step trained, the student "
                            "is QAD's start (raise --qad-budget-minutes)"
                        )
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(progress, self.cfg) * group["lr_ratio"]
                self.optimizer.zero_grad(set_to_none=True)
                loss = _global_step(self.student, self.teacher, self.plan.batch(step).to(device), self.cfg)
                update(self.optimizer, self.cfg)
                seconds = time.monotonic() - tick
                record = {
                    "step": step,
                    "loss": loss,
                    "loss_kind": self.cfg.loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(tokens_per_step / seconds, 1),
                }
                losses.append(record)
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                step += 1
                if budgeted:  # the bar's length follows the steps the rest of the window holds at the current pace
                    bar.total = step + max(0, int((1 - progress) * self.schedule.window / _recent_step_seconds(losses)))
                bar.set_postfix(
                    {
                        self.cfg.loss: f"{loss:.4f}",
                        "lr": f"{record['lr']:.1e}",
                        "tok/s": f"{record['tokens_per_s']:.0f}",
                    }
                )
                bar.update(1)
                if step == self.plan.total and not budgeted or _checkpoint_due(step - 1, last_save, self.cfg):
                    _save_checkpoint(
                        self.workdir,
                        self.params,
                        self.optimizer,
                        step,
                        self.plan.total,
                        losses,
                        self.cfg,
                        self.schedule.state(progress),
                    )
                    last_save = time.monotonic()
        finally:
            bar.close()
            if log_file:
                log_file.close()
