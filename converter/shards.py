"""Safetensors checkpoints larger than memory: a lazy reader over a folder's shards and a writer that
streams tensors into shards laid out before any data exists.

Reader: nothing is read until a tensor is asked for, and then that tensor alone. Writer: Hugging Face's layout, `model-0000N-of-0000M.safetensors` of at most
`max_shard_bytes` each plus `model.safetensors.index.json` (one `model.safetensors` when it all fits in
one), each file's header written first from the declared names, dtypes and shapes, then the data as it
comes, in the declared order.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nvfp4.errors import UserError

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")
_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float64: "F64",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
}
_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


class Checkpoint:
    """The tensors of a folder's safetensors files, each read from its file when asked for.

    Plain reads, not memory maps: a mapped file's pages stay resident in the process (and count in its
    peak memory) for as long as the mapping lives; a read tensor is freed with its last reference."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = (
            _indexed_files(self.folder / INDEX)
            if (self.folder / INDEX).is_file()
            else [p.name for p in sorted(self.folder.glob("*.safetensors"))]
        )
        if not files:
            raise UserError(f"no safetensors weights in {self.folder} (pickled checkpoints are not loaded)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, its header entry, data start)
        for name in files:
            path = self.folder / name
            header, start = _header(path)
            self.entries.update({key: (path, value, start) for key, value in header.items() if key != "__metadata__"})

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> Tensor:
        path, entry, start = self.entries[name]
        begin, end = entry["data_offsets"]  # checked against the file's size when it was opened (_header)
        data = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            if handle.readinto(data) != len(data):
                raise UserError(f"corrupt checkpoint {path}: {name} is cut short")
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(_FROM_CODE[entry["dtype"]]).reshape(entry["shape"])

    def all(self) -> dict[str, Tensor]:
        """Every tensor, read at once (a checkpoint that fits in memory)."""
        return {name: self.get(name) for name in self.entries}


def _indexed_files(index: Path) -> list[str]:
    """The shard files an index names: plain file names, so that an index cannot point outside its folder."""
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise ValueError(f"{index.stat().st_size} bytes")
        weight_map = json.loads(index.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"corrupt {index}: {error}") from error
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"corrupt {index}: no weight_map object")
    files = set(weight_map.values())
    strange = [f for f in files if not isinstance(f, str) or f in ("", ".", "..") or Path(f).name != f]
    if strange:
        raise UserError(f"corrupt {index}: {_short(strange[0])} is not a file name in {index.parent}")
    return sorted(files)


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries and where its data starts, each entry checked against the file: a
    crafted header must make us neither allocate nor read what the file does not hold."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, too short to hold a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a {length}-byte header in a {size}-byte file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
        raise UserError(f"corrupt checkpoint {path}: {str(error)[:200]}") from error
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise UserError(f"corrupt checkpoint {path}: not a safetensors header")
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - length)
    _check_no_overlap(path, header)
    return header, 8 + length


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> None:
    """One tensor's entry: a dtype we read, a shape of non-negative ints, and offsets inside the data that
    hold exactly that shape's bytes."""

    def corrupt(why: str) -> UserError:
        return UserError(f"corrupt checkpoint {path}: tensor {_short(name)} {why}")

    if not isinstance(entry, dict):
        raise corrupt("has no dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _FROM_CODE:
        raise corrupt(f"has dtype {_short(dtype)}, which is not read (known: {', '.join(_FROM_CODE)})")
    if not _ints(shape) or any(dim < 0 for dim in shape):
        raise corrupt(f"has shape {_short(shape)}")
    if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_bytes:
        raise corrupt(f"has data_offsets {_short(offsets)}, outside the file's {data_bytes} data bytes")
    needed = math.prod(shape) * _FROM_CODE[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        raise corrupt(
            f"of shape {_short(shape)} {dtype} needs {needed} bytes; its data_offsets hold {offsets[1] - offsets[0]}"
        )


def _check_no_overlap(path: Path, header: dict) -> None:
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items())
    for (_, end, before), (begin, _, after) in zip(spans, spans[1:]):
        if begin < end:
            raise UserError(f"corrupt checkpoint {path}: tensors {_short(before)} and {_short(after)} share bytes")


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)  # type(): not bool


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes tensors declared up front (`specs`, in the order they will come) into shards of `out`."""

    def __init__(
        self,
        out: Path,
        specs: list[Spec],
        metadata: dict[str, str] | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ):
        self.out, self.metadata = Path(out), {"format": "pt", **(metadata or {})}
        self.shards: list[list[Spec]] = [[]]
        for spec in specs:
            if self.shards[-1] and sum(s.nbytes for s in self.shards[-1]) + spec.nbytes > max_shard_bytes:
                self.shards.append([])
            self.shards[-1].append(spec)
        self._pending = [spec for shard in self.shards for spec in shard]
        self._starts = {sum(len(s) for s in self.shards[:i]) for i in range(len(self.shards))}  # each shard's first
        self._next, self._shard, self._file = 0, -1, None

    def file_name(self, index: int) -> str:
        return (
            "model.safetensors"
            if len(self.shards) == 1
            else f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
        )

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        header, offset = {"__metadata__": self.metadata}, 0
        for spec in self.shards[self._shard]:
            header[spec.name] = {
                "dtype": _DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._file = open(self.out / self.file_name(self._shard), "wb")  # noqa: SIM115 - closed by the next shard / close()
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: Tensor) -> None:
        spec = self._pending[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if self._next in self._starts:
            self._open_next_shard()
        self._file.write(
            memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        )  # no copy
        self._next += 1

    def close(self) -> list[Path]:
        if self._next != len(self._pending):
            raise ValueError(f"{len(self._pending) - self._next} declared tensors were never written")
        if self._file is not None:
            self._file.close()
        files = [self.out / self.file_name(i) for i in range(len(self.shards))]
        if len(self.shards) > 1:
            weight_map = {spec.name: self.file_name(i) for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for spec in self._pending)
            (self.out / INDEX).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        return files
