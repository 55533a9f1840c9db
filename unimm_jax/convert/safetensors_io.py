"""Streaming safetensors I/O: one tensor at a time, never the whole checkpoint.

The `safetensors` package memory-maps files; resident mapped pages count towards a process's
RSS, so copying a mapped checkpoint into a new layout costs two copies. Here a tensor is read
with `readinto` straight into its destination buffer, and written from a producer callback
after a header computed from shapes alone, so peak memory stays near one copy of the model.
The byte format is the standard one (8-byte little-endian header size, JSON header, data).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model: the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses a .safetensors header: ({name: TensorInfo}, metadata)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: file too short to be safetensors.")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CheckpointError(f"{path}: header size {n} is implausible; the file is not safetensors.")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e}).") from e
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    infos = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {h['dtype']}.")
        s, e = h["data_offsets"]
        infos[name] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), base + s, e - s)
    return infos, meta


class SafetensorsReader:
    """Random access to the tensors of one file or a sharded set (with an index json)."""

    def __init__(self, files: Iterable[str]):
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            infos, meta = read_header(f)
            self.infos.update(infos)
            self.metadata.update(meta)

    @classmethod
    def from_dir(cls, directory: str, stem: str = "model") -> "SafetensorsReader":
        index = os.path.join(directory, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [x for x in files if not os.path.exists(os.path.join(directory, x))]
            if missing:
                raise CheckpointError(f"{directory}: the index names shard files that are missing: {missing}.")
            return cls(os.path.join(directory, x) for x in files)
        single = os.path.join(directory, f"{stem}.safetensors")
        if os.path.exists(single):
            return cls([single])
        raise CheckpointError(f"{directory}: no {stem}.safetensors or {stem}.safetensors.index.json.")

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """Reads one tensor (into `out` when given, which must have its size and dtype)."""
        if key not in self.infos:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint.")
        info = self.infos[key]
        arr = np.empty(info.shape, info.dtype) if out is None else out
        if arr.nbytes != info.nbytes or arr.dtype != info.dtype:
            raise CheckpointError(f"tensor {key!r}: buffer {arr.dtype}{arr.shape} does not fit {info.dtype}{info.shape}.")
        with open(info.path, "rb") as f:
            f.seek(info.start)
            view = memoryview(arr.reshape(-1).view(np.uint8))
            if f.readinto(view) != info.nbytes:
                raise CheckpointError(f"tensor {key!r}: file {info.path} is truncated.")
        return arr


@dataclass
class PlannedTensor:
    """A tensor to write: its name, shape and dtype up front, its data from `produce()`."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _write_file(path: str, tensors: list[PlannedTensor], metadata: Mapping[str, str] | None) -> None:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": CODES[np.dtype(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = np.ascontiguousarray(t.produce())
            if arr.shape != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise CheckpointError(f"tensor {t.name!r}: produced {arr.dtype}{arr.shape}, planned {np.dtype(t.dtype)}{tuple(t.shape)}.")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr


def write_sharded(
    directory: str,
    tensors: Iterable[PlannedTensor],
    *,
    stem: str = "model",
    max_shard_bytes: int = 5 * 1024**3,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes tensors as `{stem}.safetensors`, or shards plus `{stem}.safetensors.index.json`
    when they exceed `max_shard_bytes`. Returns the file names written."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise CheckpointError(f"tensor {t.name!r} planned twice.")
        seen.add(t.name)
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        _write_file(os.path.join(directory, name), shards[0], meta)
        return [name]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        _write_file(os.path.join(directory, name), shard, meta)
        for t in shard:
            weight_map[t.name] = name
            total += t.nbytes
    with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [f"{stem}.safetensors.index.json"]


def iter_plan_from_arrays(arrays: Mapping[str, np.ndarray]) -> Iterator[PlannedTensor]:
    """Plan for tensors already in memory (small side files such as extras)."""
    for k, v in arrays.items():
        yield PlannedTensor(k, tuple(v.shape), v.dtype, lambda v=v: v)
