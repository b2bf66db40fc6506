"""Read Hugging Face checkpoints (config.json + one or many safetensors shards) by memory map,
grouped into blocks: the embeddings, each transformer layer, and the head (final norm + lm_head)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from blockmerge.io.dtypes import SAFETENSORS_DTYPES
from safetensors import safe_open

# `model.layers.3.`, `transformer.h.3.`, `gpt_neox.layers.3.`, `model.decoder.layers.3.`
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|embed_positions)\.")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the base model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Block:
    """A group of tensors merged together: 'embed', 'layers.{i}' or 'head'."""

    name: str
    tensors: tuple[str, ...]

    @property
    def layer(self) -> int | None:
        return int(self.name.split(".")[1]) if self.name.startswith("layers.") else None


def block_name(tensor: str) -> str:
    m = LAYER_RE.search(tensor)
    if m:
        return f"layers.{int(m.group(1))}"
    return "embed" if EMBED_RE.search(tensor) else "head"


def _block_order(name: str) -> tuple[int, int]:
    if name == "embed":
        return (0, 0)
    if name == "head":
        return (2, 0)
    return (1, int(name.split(".")[1]))


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no model.safetensors, index or *.safetensors file")
    return found


def allow_nonfinite() -> bool:
    """Whether NaN/Inf in input tensors is accepted (`blockmerge --allow-nonfinite` sets
    BLOCKMERGE_ALLOW_NONFINITE=1); by default it is an error naming the model and the tensor."""
    return os.environ.get("BLOCKMERGE_ALLOW_NONFINITE", "") not in ("", "0")


_MINMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _all_finite(t: torch.Tensor) -> bool:
    """True when t is certainly finite: its min and max (one pass, NaN propagates into both) are finite.
    torch.isfinite(t).all() writes a bool tensor of every element first, about 30x slower on CPU."""
    if t.numel() == 0 or t.dtype not in _MINMAX_DTYPES:
        return t.numel() == 0
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(t: torch.Tensor, where: str, name: str) -> None:
    """NaN/Inf in a floating tensor is an error naming its file/folder and the tensor, unless allowed."""
    if not t.is_floating_point() or allow_nonfinite() or _all_finite(t):
        return
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise CheckpointError(f"{where}: tensor {name} contains {bad} values (pass --allow-nonfinite to use it anyway)")


class Checkpoint:
    """Tensor metadata of a checkpoint, and tensors read on demand from the memory-mapped shards.
    Each floating tensor is checked for NaN/Inf the first time it is read (see `check_finite`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._checked: set[str] = set()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint folder")
        cfg = self.path / "config.json"
        try:
            self.config: dict = json.loads(cfg.read_text()) if cfg.exists() else {}
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from e
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for f in shard_files(self.path):
            with self._open(f) as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    self.tensors[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, f)

    @staticmethod
    def _open(f: Path):
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into its own (anonymous) memory; the mapping is dropped by `release`."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        h = self._handles.get(info.file)
        if h is None:
            h = self._handles[info.file] = self._open(info.file)
        try:
            t = h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name} ({e})") from e
        if name not in self._checked:  # once per tensor: learning re-reads blocks every step
            check_finite(t, str(self.path), name)
            self._checked.add(name)
        return t

    def release(self) -> None:
        """Unmap the shards so that pages already read stop counting against this process."""
        self._handles.clear()

    def blocks(self) -> list[Block]:
        groups: dict[str, list[str]] = {}
        for name in self.tensors:
            groups.setdefault(block_name(name), []).append(name)
        return [Block(b, tuple(groups[b])) for b in sorted(groups, key=_block_order)]

    @property
    def num_layers(self) -> int:
        return sum(1 for b in self.blocks() if b.layer is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def check_compatible(base: Checkpoint, experts: list[Checkpoint], any_rows: Collection[str] = ()) -> None:
    """Every expert must hold exactly the base's tensor names, shapes and dtypes; name the first mismatch.
    Tensors in `any_rows` (a vocabulary's embedding and head) may differ in their number of rows."""
    for ex in experts:
        for name, info in base.tensors.items():
            other = ex.tensors.get(name)
            if other is None:
                raise CheckpointError(f"{ex.path}: tensor {name} of base {base.path} is missing")
            first = 1 if name in any_rows else 0  # compare from the first dimension that must agree
            if other.shape[first:] != info.shape[first:]:
                raise CheckpointError(
                    f"{ex.path}: tensor {name} has shape {list(other.shape)}, base has {list(info.shape)}"
                )
            if other.dtype != info.dtype:
                raise CheckpointError(f"{ex.path}: tensor {name} has dtype {other.dtype}, base has {info.dtype}")
        extra = set(ex.tensors) - set(base.tensors)
        if extra:
            raise CheckpointError(f"{ex.path}: tensor {sorted(extra)[0]} is not in base {base.path}")
