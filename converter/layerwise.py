"""Post-training quantization one decoder layer at a time: models larger than memory.

The model is a skeleton on the meta device; a decoder layer's weights are read from the safetensors
shards when its turn comes (converter/shards.py), smoothed, quantized, calibrated, written to every
target (the writers lay their files out first, converter/writers/base.py) and freed. The calibration
batch flows through the model a layer at a time: each layer runs on the previous layer's outputs with
the arguments the model's own forward gives it (captured once, `capture_layer_inputs`), and passes on
its unquantized output, as the whole-model calibration forward does, so the bytes written are the
whole-model path's. Peak memory: about two decoder layers, the embedding or the head (one at a time),
and the activations of the calibration and evaluation tokens, whatever the depth.

The held-out evaluation streams too: teacher and student run the held-out prose a layer at a time
beside the quantization (KL, top-1, perplexity; the chat rows need the teacher's generated answers,
which a model that does not fit cannot give).
"""

import ctypes
import gc
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.families import family_of, hub_names
from nvfp4.converter.model_config import read_config
from nvfp4.converter.moe import calibrating_all_experts, unfuse_experts
from nvfp4.converter.quantize import _stacked, calibrate_modules, eligible_linears, quantize, quantized_modules
from nvfp4.converter.shards import Checkpoint
from nvfp4.converter.smoothing import recording_channel_amax, smooth_layer
from nvfp4.converter.stages import needs_calibration_data
from nvfp4.converter.writers import Entry, Writer, entries
from nvfp4.errors import UserError
from nvfp4.kernels.kl import token_kl


class ShardedModel:
    """A model's skeleton on the meta device; `load(module, name)` reads one module's tensors from the
    shards (the Hub's names; an expert's gate and up read into its one gate_up linear)."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.dtype = Path(folder), dtype
        read_config(self.folder)  # bounded and checked before transformers builds anything from it
        self.config = AutoConfig.from_pretrained(self.folder)
        self.family = family_of(self.config)
        self.checkpoint = Checkpoint(self.folder)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        unfuse_experts(self.model)
        self.model.eval().requires_grad_(False)
        self.decoder = self.model.get_decoder()
        self.layers_name = next(n for n, m in self.model.named_modules() if m is self.decoder.layers)

    def tensor(self, name: str) -> Tensor:
        module, _, leaf = name.rpartition(".")
        hubs = [f"{hub}.{leaf}" for hub in hub_names(self.family, module)]
        if name == "lm_head.weight" and hubs[0] not in self.checkpoint and self.config.tie_word_embeddings:
            hubs = [f"{hub_names(self.family, self.embedding_name)[0]}.weight"]
        missing = [hub for hub in hubs if hub not in self.checkpoint]
        if missing:
            raise UserError(f"{self.folder}: the checkpoint has no tensor {missing[0]}")
        parts = [self.checkpoint.get(hub) for hub in hubs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def embedding_name(self) -> str:
        return next(n for n, m in self.model.named_modules() if m is self.model.get_input_embeddings())

    def load(self, module: nn.Module, name: str) -> nn.Module:
        """Give `module` (named `name` in the model) its weights, in the compute dtype; -> module."""
        for leaf, tensor in list(module.named_parameters(prefix=name)) + list(module.named_buffers(prefix=name)):
            if not tensor.is_meta:
                continue
            owner_name, _, attribute = leaf.rpartition(".")
            owner = module.get_submodule(owner_name.removeprefix(name).lstrip("."))
            if attribute in owner._buffers:  # persistent buffers live in the checkpoint; the others are computed
                if attribute in owner._non_persistent_buffers_set:
                    continue
                owner._buffers[attribute] = self.tensor(leaf).to(tensor.dtype)
            else:
                value = self.tensor(leaf)
                owner._parameters[attribute] = nn.Parameter(
                    value.to(self.dtype) if value.is_floating_point() else value, requires_grad=False
                )
        return module

    def layer(self, index: int) -> tuple[nn.Module, str]:
        name = f"{self.layers_name}.{index}"
        return self.load(self.decoder.layers[index], name), name

    @staticmethod
    def release(module: nn.Module) -> None:
        module.to("meta")
        gc.collect()
        _trim_heap()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc): a layer's many small tensors, freed, otherwise leave
    their pages to the process, and the resident memory grew by ~50 MB a layer of an 8B model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the arguments the model's forward gives that layer."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


def capture_layer_inputs(model: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], list[list[tuple]]]:
    """Run the model's decoder with every layer replaced by a catcher: -> (layer 0's input per batch,
    per layer the (args, kwargs) of every batch). Needs the embedding, the RoPE buffers and the final norm."""
    decoder = model.get_decoder()
    layers = decoder.layers
    calls = [[] for _ in layers]
    decoder.layers = nn.ModuleList(_Catcher(c) for c in calls)
    try:
        with torch.no_grad():
            for batch in batches:
                decoder(input_ids=batch, use_cache=False)
    finally:
        decoder.layers = layers
    return [hidden for hidden, _, _ in calls[0]], [[(args, kwargs) for _, args, kwargs in layer] for layer in calls]


def run_layer(layer: nn.Module, inputs: list[Tensor], arguments: list[tuple]) -> list[Tensor]:
    with torch.no_grad():
        return [layer(hidden, *args, **kwargs) for hidden, (args, kwargs) in zip(inputs, arguments)]


class _Evaluation:
    """Teacher and student on the held-out prose, a layer at a time: hidden states in, metrics out."""

    def __init__(self, samples: list[Tensor]):
        self.samples = samples
        self.teacher: list[Tensor] = []
        self.student: list[Tensor] = []
        self.arguments: list[list[tuple]] = []

    def metrics(self, norm_and_head: Callable[[Tensor], Tensor]) -> dict[str, float]:
        kl, top1, nll, tokens = [], [], 0.0, 0
        for ids, t, s in zip(self.samples, self.teacher, self.student):
            teacher, student = norm_and_head(t)[0, :-1].float(), norm_and_head(s)[0, :-1].float()
            kl.append(token_kl(teacher, student))
            top1.append((teacher.argmax(-1) == student.argmax(-1)).float())
            nll += torch.nn.functional.cross_entropy(student, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
        return {
            "prose_kl": torch.cat(kl).mean().item(),
            "prose_top1": torch.cat(top1).mean().item(),
            "prose_ppl": float(torch.tensor(nll / tokens).exp()),
        }


@contextmanager
def _attached(modules: Iterable[tuple[nn.Module, str]], source: "ShardedModel"):
    """The named small modules loaded from the shards for the duration of the block, then released."""
    loaded = [source.load(module, name) for module, name in modules]
    try:
        yield loaded
    finally:
        for module in loaded:
            source.release(module)


def quantize_layerwise(
    source: ShardedModel,
    cfg: QuantConfig,
    batches: list[Tensor] | None,
    writers: list[Writer],
    eval_samples: list[Tensor] | None,
    all_experts: bool = True,
    train_layer: Callable | None = None,
) -> dict | None:
    """Quantize `source` one decoder layer at a time into the writers (begun by the caller with the entries of
    `export_stream`); -> the held-out prose metrics of the student against its teacher, when `eval_samples`.
    `train_layer(layer, index, layers, student inputs, targets, arguments)` (layer-local QAD) trains each quantized
    layer on the calibration sequences before it is written: its inputs are the quantized layers' outputs, its
    targets the unquantized layer's."""
    run = _Run(source, cfg, writers, all_experts, train_layer)
    if train_layer is not None:  # one sequence a step: the calibration batches unstacked
        run.begin(list(batches), eval_samples)
    else:
        run.begin(list(_stacked(batches)) if batches is not None and needs_calibration_data(cfg) else [], eval_samples)
    for index in tqdm(range(len(source.decoder.layers)), desc="layers", unit="layer"):
        run.layer(index)
    return run.end()


class _Run:
    """The state that flows from layer to layer: the calibration stream (and, when smoothing, the unsmoothed
    one its statistics come from), the evaluation streams, and the entries still to write."""

    def __init__(
        self,
        source: ShardedModel,
        cfg: QuantConfig,
        writers: list[Writer],
        all_experts: bool,
        train_layer: Callable | None = None,
    ):
        self.source, self.cfg, self.writers, self.all_experts = source, cfg, writers, all_experts
        self.train_layer = train_layer
        stream = export_stream(source, cfg)
        inside = [i for i, entry in enumerate(stream) if entry.layer is not None]
        self.prefix, self.suffix = stream[: inside[0]], stream[inside[-1] + 1 :]
        self.by_layer: dict[int, list[Entry]] = {}
        for entry in stream[inside[0] : inside[-1] + 1]:
            self.by_layer.setdefault(entry.layer, []).append(entry)
        self.calibration: list[Tensor] = []
        self.unsmoothed: list[Tensor] = []
        self.evaluation: _Evaluation | None = None

    def begin(self, stacked: list[Tensor], eval_samples: list[Tensor] | None) -> None:
        """Layer 0's inputs (the embedding in fp32 while they are computed), then the embedding written as stored
        (the writers cast it as they cast the whole model's fp32 copy)."""
        from nvfp4.converter.checkpoint import materialise_non_persistent_buffers

        model = self.source.model
        materialise_non_persistent_buffers(model)  # RoPE frequencies, Gemma's embedding scale
        with _attached(
            [(model.get_input_embeddings(), self.source.embedding_name), _final_norm(self.source)], self.source
        ):
            if stacked:
                self.calibration, self.arguments = capture_layer_inputs(model, stacked)
                self.unsmoothed = self.student = self.calibration
            if eval_samples:
                self.evaluation = _Evaluation(eval_samples)
                self.evaluation.teacher, self.evaluation.arguments = capture_layer_inputs(model, eval_samples)
                self.evaluation.student = list(self.evaluation.teacher)
        for entry in self.prefix:
            _write(self.writers, entry, self.source.tensor(entry.name))

    def layer(self, index: int) -> None:
        layer, name = self.source.layer(index)
        evaluation, cfg = self.evaluation, self.cfg
        if evaluation:
            evaluation.teacher = run_layer(layer, evaluation.teacher, evaluation.arguments[index])
        if cfg.smooth_alpha and self.calibration:  # statistics from the unsmoothed model, as `smooth` takes them
            linears = {n: m for n, m in layer.named_modules(prefix=name) if isinstance(m, nn.Linear)}
            with recording_channel_amax(linears) as amax, calibrating_all_experts(layer, self.all_experts):
                self.unsmoothed = run_layer(layer, self.unsmoothed, self.arguments[index])
            smooth_layer(layer, name, amax, self.source.config, cfg.smooth_alpha)
        quantize(layer, cfg, prefix=name)
        if self.calibration:
            modules = quantized_modules(layer, prefix=name)
            inputs, arguments = self.calibration, self.arguments[index]
            with calibrating_all_experts(layer, self.all_experts):
                self.calibration = calibrate_modules(modules, lambda: run_layer(layer, inputs, arguments), cfg)
            if not cfg.smooth_alpha:
                self.unsmoothed = self.calibration
        if self.train_layer is not None:
            self.train_layer(
                layer, index, len(self.source.decoder.layers), self.student, self.calibration, self.arguments[index]
            )
            self.student = run_layer(layer, self.student, self.arguments[index])
        if evaluation:
            evaluation.student = run_layer(layer, evaluation.student, evaluation.arguments[index])
        packed = {n: m.export() for n, m in quantized_modules(layer, prefix=name).items()}
        state = layer.state_dict(prefix=f"{name}.")
        for entry in self.by_layer.get(index, []):
            _write(self.writers, entry, packed[entry.name] if entry.packed else state[entry.name].detach())
        del packed, state
        self.source.release(layer)

    def end(self) -> dict | None:
        """The final norm and head written; the evaluation's metrics from the head in fp32."""
        for entry in self.suffix:
            _write(self.writers, entry, self.source.tensor(entry.name))
        if not self.evaluation:
            return None
        model = self.source.model
        with _attached([_final_norm(self.source), (model.get_output_embeddings(), "lm_head")], self.source):
            norm, head = self.source.decoder.norm, model.get_output_embeddings()
            return self.evaluation.metrics(lambda hidden: head(norm(hidden)))


def _final_norm(source: "ShardedModel") -> tuple[nn.Module, str]:
    return source.decoder.norm, next(n for n, m in source.model.named_modules() if m is source.decoder.norm)


def export_stream(source: ShardedModel, cfg: QuantConfig) -> list[Entry]:
    """The entries the writers are begun with: the skeleton's tensors, its to-be-quantized linears packed."""
    linears = eligible_linears(source.model, cfg)
    return entries(source.model, {name: cfg.quantize_activations for name in linears})


def _write(writers: list[Writer], entry: Entry, value) -> None:
    for writer in writers:
        writer.add(entry, value)
