"""The convert's algorithms as stages with a declared lifecycle (the shape of llm-compressor's modifiers and
torchao's registered handlers). The pipeline fires the same events for the whole model in memory and for one
decoder layer streamed from the shards (converter/layerwise.py), and knows no algorithm by name.

A PTQ stage's events, for each subgraph (the model, or one decoder layer), in this order:
- `after_quantize(modules)`: the fake-quant modules exist; what the weights alone decide (a weight-only search);
- `begin_calibration(modules)`: before the calibration forward;
- `observe(name, module, x)`: each quantized linear's input on the calibration forward, which runs unquantized
  (the teacher's ranges), per batch; only stages with `observes = True` are shown inputs;
- `after_calibration(modules)`: what the inputs decided is set on the modules (input scales, searches, GPTQ).
Per-module state lives in the stage, keyed by module name. Stages are registered by name and picked from the
QuantConfig (`selected`); `after_calibration` runs in registration order (a search fixes the block scales that
GPTQ then rounds with).

Training stages (`TrainingStage`, registered by `nvfp4.qad`) declare what they need of the run (`Requirements`)
and the memory they add per device; the pipeline calls `train_layer` for each decoder layer it streams and
`train` once for the model in memory.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nvfp4.converter.config import CHOICES, QuantConfig
from nvfp4.converter.groups import fused_groups, input_scale_groups
from nvfp4.errors import UserError
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import NVFP4FakeQuantLinear

Modules = dict[str, NVFP4FakeQuantLinear]


class PTQStage:
    """One post-training algorithm; every event is optional."""

    name: ClassVar[str]
    option: ClassVar[str | None] = None  # the QuantConfig field whose value `name` selects it
    observes: ClassVar[bool] = False  # shown the calibration inputs

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg
        self.moments = _Moments()  # what an observing stage sums over the calibration rows, per module

    @classmethod
    def selected(cls, cfg: QuantConfig) -> bool:
        return cls.option is not None and getattr(cfg, cls.option) == cls.name

    def after_quantize(self, modules: Modules) -> None:
        pass

    def begin_calibration(self, modules: Modules) -> None:
        pass

    def observe(self, name: str, module: NVFP4FakeQuantLinear, x: Tensor) -> None:
        pass

    def after_calibration(self, modules: Modules) -> None:
        pass


PTQ_STAGES: dict[str, type[PTQStage]] = {}


def register_ptq_stage(cls: type[PTQStage]) -> type[PTQStage]:
    """Register a stage; one selected by a QuantConfig field's value adds that value to the field's choices."""
    PTQ_STAGES[cls.name] = cls
    if cls.option is not None and cls.name not in CHOICES[cls.option]:
        CHOICES[cls.option].append(cls.name)
    return cls


def ptq_stages(cfg: QuantConfig) -> list[PTQStage]:
    """The stages `cfg` selects, in registration order."""
    return [cls(cfg) for cls in PTQ_STAGES.values() if cls.selected(cfg)]


def calibration_needed(cfg: QuantConfig) -> bool:
    """A selected stage reads the calibration inputs."""
    return any(cls.observes and cls.selected(cfg) for cls in PTQ_STAGES.values())


def needs_calibration_data(cfg: QuantConfig) -> bool:
    """The run needs calibration batches: for a stage that reads inputs, or for the smoothing's channel ranges."""
    return calibration_needed(cfg) or cfg.smooth_alpha > 0


class _Moments:
    """Per-module running sums of the inputs' rows (their count, and what `add` accumulates)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, rows: int, value: Tensor) -> None:
        self.rows[name] = self.rows.get(name, 0) + rows
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def means(self) -> dict[str, Tensor]:
        return {name: total / self.rows[name] for name, total in self.sums.items()}


def _rows(module: NVFP4FakeQuantLinear, x: Tensor) -> Tensor:
    return x.detach().float().reshape(-1, module.in_features)


@register_ptq_stage
class InputScales(PTQStage):
    """W4A4: a static per-tensor input scale from the calibration amax, shared by the linears that share an
    input (a fused group; one projection of every expert of a layer), as ModelOpt's `max` calibration sets it."""

    name = "input-scales"
    observes = True

    def __init__(self, cfg: QuantConfig):
        super().__init__(cfg)
        self.amax: dict[str, Tensor] = {}
        self._last: tuple[Tensor, Tensor] | None = None  # q/k/v and gate/up receive one tensor in turn

    @classmethod
    def selected(cls, cfg: QuantConfig) -> bool:
        return cfg.quantize_activations

    def _input_amax(self, x: Tensor) -> Tensor:
        if self._last is None or self._last[0] is not x:
            low, high = torch.aminmax(x.detach())  # one pass, no |x| temporary; exact, as abs().amax()
            self._last = (x, torch.maximum(-low, high).float())
        return self._last[1]

    def observe(self, name: str, module: NVFP4FakeQuantLinear, x: Tensor) -> None:
        value = self._input_amax(x)
        self.amax[name] = torch.maximum(self.amax[name], value) if name in self.amax else value

    def after_calibration(self, modules: Modules) -> None:
        self._last = None  # frees the last input
        for group in input_scale_groups(n for n, m in modules.items() if m.quantize_input):
            recorded = [self.amax[n] for n in group if n in self.amax]
            if not recorded:  # no calibration token reached these experts (--expert-calibration routed)
                raise UserError(
                    f"no calibration token reached {group[0]} (and {len(group) - 1} more): calibrate "
                    "with more tokens or `expert_calibration` all",
                    field="expert_calibration",
                )
            shared = numerics.activation_global_scale(torch.stack(recorded).amax())
            for name in group:
                modules[name].input_gscale = shared.to(modules[name].weight.device)


@register_ptq_stage
class WeightMSESearch(PTQStage):
    """scale_search mse: each block's FP8 scale searched for the least squared weight error."""

    name = "mse"
    option = "scale_search"

    @torch.no_grad()
    def after_quantize(self, modules: Modules) -> None:
        from nvfp4.kernels.scale_search import search_block_scales

        for module in modules.values():
            module.block_scales = search_block_scales(module.weight, module.weight_gscale, "mse")


@register_ptq_stage
class ActivationWeightedSearch(PTQStage):
    """scale_search mse-act: each block's FP8 scale searched for the least output error, the squared weight
    error weighted by the input channel's mean square E[x^2] over the calibration tokens."""

    name = "mse-act"
    option = "scale_search"
    observes = True

    def observe(self, name: str, module: NVFP4FakeQuantLinear, x: Tensor) -> None:
        rows = _rows(module, x)
        self.moments.add(name, rows.shape[0], rows.square().sum(0))

    @torch.no_grad()
    def after_calibration(self, modules: Modules) -> None:
        from nvfp4.kernels.scale_search import search_block_scales

        for name, mean_square in self.moments.means().items():
            module = modules[name]
            module.block_scales = search_block_scales(module.weight, module.weight_gscale, "mse-act", mean_square)


@register_ptq_stage
class GPTQRounding(PTQStage):
    """rounding gptq: error-compensated rounding from the inputs' X^T X, recorded once per fused group (its
    members share the input); groups of one shape (the same linear in every layer) are rounded together."""

    name = "gptq"
    option = "rounding"
    observes = True

    def __init__(self, cfg: QuantConfig):
        super().__init__(cfg)
        self.leads: set[str] = set()  # each fused group's first member holds the group's X^T X

    def begin_calibration(self, modules: Modules) -> None:
        self.leads = {group[0] for group in fused_groups(modules)}

    def observe(self, name: str, module: NVFP4FakeQuantLinear, x: Tensor) -> None:
        if name in self.leads:
            rows = _rows(module, x)
            previous = self.moments.sums.pop(name, None)
            self.moments.add(
                name, rows.shape[0], rows.T @ rows if previous is None else torch.addmm(previous, rows.T, rows)
            )

    @staticmethod
    def hessian_bytes(linears: dict[str, nn.Module]) -> int:
        """What it holds for these linears (the memory plan): one fp32 K x K Hessian per fused group."""
        return sum(4 * linears[group[0]].in_features ** 2 for group in fused_groups(linears))

    @torch.no_grad()
    def after_calibration(self, modules: Modules) -> None:
        from nvfp4.kernels.gptq import gptq_round

        hessians = self.moments.means()
        by_shape: dict[tuple, list[list[str]]] = {}
        for group in fused_groups(modules):
            if group[0] in hessians:
                shape = (sum(modules[n].out_features for n in group), modules[group[0]].in_features)
                by_shape.setdefault(shape, []).append(group)
        for groups in tqdm(by_shape.values(), desc="GPTQ", unit="shape", leave=False, disable=not by_shape):
            members = [[modules[n] for n in group] for group in groups]
            weights = torch.stack([torch.cat([m.weight for m in group]) for group in members])
            fixed = members[0][0].block_scales is not None
            scales = torch.stack([torch.cat([m.block_scales for m in group]) for group in members]) if fixed else None
            latent = gptq_round(
                weights,
                torch.stack([hessians[group[0]] for group in groups]),
                torch.stack([group[0].weight_gscale for group in members]),
                scales,
            )
            for group, rounded in zip(members, latent):
                for module, part in zip(group, rounded.split([m.out_features for m in group])):
                    module.weight.copy_(part.to(module.weight.dtype))


@dataclass(frozen=True)
class Requirements:
    """What a training stage asks of the run before any work (the memory plan, the data, the checkpoints)."""

    whole_model: bool  # trains the model in memory after PTQ (else: each layer as it is quantized)
    per_layer: bool  # trains each decoder layer on the calibration sequences
    batch: int = 1
    seq_len: int = 128
    resume: bool = False  # continues from the checkpoints in the run's workdir
    state_bytes_per_weight: int = 0  # what training holds per quantized weight beyond it (gradient, optimizer)
    row: str = "trained"  # the report's row of the trained student, and the stage's name in messages
    # The stage's own words for the user's way out when its plan does not fit: running without it, a variant
    # that streams layer by layer, the batch setting
    without: str = "no training"
    streamed: str = "layer-by-layer training"
    batch_flag: str = "batch"


@dataclass
class TrainingContext:
    """What the pipeline hands a training stage for the model in memory."""

    student: nn.Module
    teacher: nn.Module
    tokenizer: object
    workdir: Path  # survives an interrupted run: checkpoints for --resume
    logdir: Path  # OUT/qad: the stage's log and plots
    calibration: list[Tensor] | None  # the calibration sequences, when `requirements.per_layer`
    reserve_seconds: float  # what the convert still does after training (a budget ends that much earlier)


class TrainingStage(ABC):
    """A training pass between calibration and export (QAD)."""

    requirements: Requirements

    @abstractmethod
    def train(self, ctx: TrainingContext) -> dict:
        """Train the model in memory; -> the report's section."""

    def train_layer(
        self,
        layer: nn.Module,
        index: int,
        layers: int,
        inputs: list[Tensor],
        targets: list[Tensor],
        arguments: list[tuple],
    ) -> None:
        """Train one streamed decoder layer: `inputs` are the quantized layers' outputs, `targets` the
        unquantized layer's, `arguments` what the model's forward gives the layer."""
        raise NotImplementedError(f"{type(self).__name__} does not train layer by layer")

    def summary(self) -> dict:
        """The report's section after `train_layer` ran for every layer."""
        return {}

    def settings(self) -> dict:
        """What the recipe records of it, for its package to rebuild the same stage."""
        return {}


TRAINING_STAGES: dict[str, type[TrainingStage]] = {}


def register_training_stage(name: str) -> Callable[[type[TrainingStage]], type[TrainingStage]]:
    def register(cls: type[TrainingStage]) -> type[TrainingStage]:
        TRAINING_STAGES[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class TrainingFlags:
    """A training package's flags of `nvfp4 convert` (click options), how their values make its stage, and the
    quantization defaults a run with training changes."""

    options: list  # click.Option
    build: Callable[[dict, int, float], TrainingStage | None]  # (the flags' values, seed, the command's start)
    quant_defaults: Callable[[dict, str], dict]  # (the flags' values, scheme) -> QuantConfig fields
    from_settings: Callable[[dict | None], dict]  # a recipe's training settings -> the flags' values
    flags: dict  # its config fields -> its flags (errors are worded by field)


TRAINING_FLAGS: list[TrainingFlags] = []


def register_training_flags(flags: TrainingFlags) -> None:
    TRAINING_FLAGS.append(flags)
