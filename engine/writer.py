"""Write a sharded safetensors checkpoint tensor by tensor, in constant memory.

Every output tensor's name, shape and dtype are known before the merge starts (they are the base's),
so shards and headers are planned up front and each tensor's bytes go straight to their offset as
soon as its block is merged. Everything is written under a temporary folder renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES

# Files copied from the base so the output loads like it (tokenizer, generation settings, chat template).
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class OutputExistsError(FileExistsError):
    pass


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace("IB", "B")
    for unit, mult in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"shard size {size!r}: expected a byte count or a size like '5GB'") from None


@dataclass
class _Slot:
    file: str
    start: int  # absolute byte offset in the shard file
    shape: tuple[int, ...]
    dtype: torch.dtype
    written: bool = False


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def prepare_output(out: str | Path, force: bool) -> tuple[Path, Path]:
    """Check OUT may be written and return (final path, fresh temporary folder beside it)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output already exists (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished temporary folder into place; an old OUT (only with --force) goes last."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class CheckpointWriter:
    """with CheckpointWriter(out, [(name, shape, dtype), ...]) as w: w.write(name, t) ...; w.finish(base_dir)"""

    def __init__(
        self,
        out: str | Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_size: int | str = "5GB",
        force: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        self.out, self.tmp = prepare_output(out, force)
        self.slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        limit = parse_size(shard_size)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for t in tensors:  # in the order given (block order), so writes are sequential
            nb = _nbytes(t[1], t[2])
            if shards[-1] and size + nb > limit:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nb
        n = len(shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for fname, shard in zip(self.files, shards, strict=True):
            self._plan_shard(fname, shard, metadata or {"format": "pt"})

    def _plan_shard(self, fname: str, shard: list, metadata: dict[str, str]) -> None:
        header: dict = {"__metadata__": metadata}
        pos = 0
        for name, shape, dtype in shard:
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nb]}
            pos += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
        data_start = 8 + len(raw)
        fd = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds[fname] = fd
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, data_start + pos)
        for name, shape, dtype in shard:
            self.slots[name] = _Slot(fname, data_start + header[name]["data_offsets"][0], tuple(shape), dtype)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name} is not part of the planned output")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"tensor {name}: got {list(tensor.shape)} {tensor.dtype}, planned {list(slot.shape)} {slot.dtype}"
            )
        buf = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        fd, off, view = self._fds[slot.file], slot.start, memoryview(buf)
        while view:  # pwrite may write less than asked for large buffers
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
        slot.written = True

    def finish(self, copy_from: str | Path | None = None, extra_json: dict[str, dict] | None = None) -> Path:
        missing = [n for n, s in self.slots.items() if not s.written]
        if missing:
            raise RuntimeError(f"output incomplete: tensor {missing[0]} (and {len(missing) - 1} more) never written")
        self._close()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(s.shape, s.dtype) for s in self.slots.values())},
                "weight_map": {n: s.file for n, s in self.slots.items()},
            }
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if copy_from is not None:
            for f in COPIED_FILES:
                src = Path(copy_from) / f
                if src.exists():
                    shutil.copy2(src, self.tmp / f)
        for fname, obj in (extra_json or {}).items():
            (self.tmp / fname).write_text(json.dumps(obj, indent=2))
        commit_output(self.tmp, self.out)
        return self.out

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()
