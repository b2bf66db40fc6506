"""Write a sharded safetensors checkpoint tensor by tensor, in constant memory.

Every output tensor's name, shape and dtype are known before the merge starts (they are the base's),
so shards and headers are planned up front and each tensor's bytes go straight to their offset as
soon as its block is merged. Everything is written under a staging folder renamed when complete, by
the output-commit protocol (blockmerge.io.commit), which every command that writes an output uses."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from blockmerge.io.commit import acquire_output
from blockmerge.io.dtypes import SAFETENSORS_CODES

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


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count; finite and at least one byte."""
    s = str(size).strip().upper().replace("IB", "B")
    mult, num = 1.0, s
    for unit, m in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("B", 1.0)):
        if s.endswith(unit):
            mult, num = m, s[: -len(unit)]
            break
    try:
        value = float(num) * mult
    except ValueError:
        value = math.nan
    if isinstance(size, bool) or not math.isfinite(value) or value < 1:
        raise ValueError(f"shard size {size!r}: expected a positive byte count or a size like '5GB'")
    return int(value)


@dataclass
class _Slot:
    file: str
    start: int  # absolute byte offset in the shard file
    shape: tuple[int, ...]
    dtype: torch.dtype
    written: bool = False


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], limit: int, metadata: dict[str, str]
) -> list[tuple[str, bytes, int, dict[str, _Slot]]]:
    """(file name, header bytes, file size, {tensor: slot}) per shard: tensors in the order given (block
    order, so writes are sequential), a new shard when the next tensor would pass `limit`. A pure function of
    its arguments, so every process of a distributed merge plans the same files."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for t in tensors:
        nb = tensor_nbytes(t[1], t[2])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [_plan_shard(f, shard, metadata) for f, shard in zip(files, shards, strict=True)]


def _plan_shard(fname: str, shard: list, metadata: dict[str, str]) -> tuple[str, bytes, int, dict[str, _Slot]]:
    header: dict = {"__metadata__": metadata}
    pos = 0
    for name, shape, dtype in shard:
        nb = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    head = len(raw).to_bytes(8, "little") + raw
    slots = {
        name: _Slot(fname, len(head) + header[name]["data_offsets"][0], tuple(shape), dtype)
        for name, shape, dtype in shard
    }
    return fname, head, len(head) + pos, slots


class ShardFiles:
    """The planned shard files of one output in a staging folder, open for writing tensors at their offsets.
    `create=True` makes the files (header written, size set); `create=False` opens files another process of a
    distributed run created, to write the tensors this process merges. With `behind` > 0 (bytes), `write`
    checks the tensor and queues it for a writer thread of its own, so the caller merges the next tensors while
    this one is written; it waits only while `behind` bytes are queued. The thread's first error is raised by
    the next `write` or by `flush` (which waits for the queue to empty), and nothing more is written."""

    def __init__(
        self, folder: Path, plan: list[tuple[str, bytes, int, dict[str, _Slot]]], create: bool, behind: int = 0
    ):
        self.folder = folder
        self.files = [f for f, _, _, _ in plan]
        self.slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        self._behind = _WriteBehind(self._put, behind) if behind > 0 else None
        try:
            for fname, head, size, slots in plan:
                flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
                fd = self._fds[fname] = os.open(folder / fname, flags, 0o644)
                if create:
                    os.pwrite(fd, head, 0)
                    os.ftruncate(fd, size)
                elif os.fstat(fd).st_size != size:
                    raise OSError(f"{folder / fname}: {os.fstat(fd).st_size} bytes, planned {size}")
                self.slots.update(slots)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name} is not part of the planned output")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"tensor {name}: got {list(tensor.shape)} {tensor.dtype}, planned {list(slot.shape)} {slot.dtype}"
            )
        cpu = tensor.detach().to("cpu").contiguous()
        if self._behind is None:
            self._put(name, cpu)
        else:
            self._behind.put(name, cpu)

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        fd, off, view = self._fds[slot.file], slot.start, memoryview(tensor.view(-1).view(torch.uint8).numpy())
        try:
            while view:  # pwrite may write less than asked for large buffers
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        except OSError as e:
            raise OSError(e.errno, e.strerror, f"{self.folder / slot.file} (tensor {name})") from e
        slot.written = True

    def flush(self) -> None:
        """Wait until every queued tensor is written; the writer thread's error, if any, is raised here."""
        if self._behind is not None:
            self._behind.flush()

    def unwritten(self) -> list[str]:
        return [n for n, s in self.slots.items() if not s.written]

    def close(self) -> None:
        """Stop the writer thread (tensors still queued are dropped) and close the files."""
        if self._behind is not None:
            self._behind.stop()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _WriteBehind:
    """A writer thread fed by a queue bounded in bytes: put(name, tensor) returns at once unless `max_bytes`
    are queued already (one tensor is always accepted). After an error nothing more is written and put/flush
    raise it; stop() drops what is queued."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], max_bytes: int):
        self._write, self._max = write, max_bytes
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, torch.Tensor, int]] = deque()
        self._queued = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="blockmerge-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            while self._error is None and self._queue and self._queued + nbytes > self._max:
                self._cond.wait()
            self._raise()
            self._queue.append((name, tensor, nbytes))
            self._queued += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                name, tensor, nbytes = self._queue[0]
            try:
                self._write(name, tensor)
            except BaseException as e:  # raised in the caller's thread by put / flush
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                if self._stopping:  # stop() dropped the queue while this tensor was written
                    return
                self._queue.popleft()
                self._queued -= nbytes
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        with self._cond:
            while self._error is None and self._queue:
                self._cond.wait()
            self._raise()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()


def write_index(folder: Path, shards: ShardFiles) -> None:
    """model.safetensors.index.json for a sharded output (nothing for one file)."""
    if len(shards.files) > 1:
        index = {
            "metadata": {"total_size": sum(tensor_nbytes(s.shape, s.dtype) for s in shards.slots.values())},
            "weight_map": {n: s.file for n, s in shards.slots.items()},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class CheckpointWriter:
    """with CheckpointWriter(out, [(name, shape, dtype), ...]) as w: w.write(name, t) ...; w.finish(base_dir)

    Holds a claim on OUT (lock, checks, staging folder) from construction to `finish` (commit) or `abort`;
    `inputs` are the paths read to make the output (OUT may not be, lie in or contain one of them).
    `write_behind` > 0: tensors are written by a thread of their own with up to that many bytes queued
    (ShardFiles); its errors are raised by `write` or `finish`, and the output is then never committed."""

    def __init__(
        self,
        out: str | Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_size: int | str = "5GB",
        force: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: Sequence[str | Path] = (),
        write_behind: int = 0,
    ):
        plan = plan_shards(tensors, parse_size(shard_size), metadata or {"format": "pt"})  # before anything exists
        self.shards: ShardFiles | None = None
        self.claim = acquire_output(out, force=force, inputs=inputs)
        self.out = self.claim.out
        try:
            self.tmp = self.claim.staging()
        except BaseException:
            self.claim.release()
            raise
        try:
            self.shards = ShardFiles(self.tmp, plan, create=True, behind=write_behind)
        except BaseException:
            self.abort()
            raise

    @property
    def slots(self) -> dict[str, _Slot]:
        return self.shards.slots

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.write(name, tensor)

    def finish(self, copy_from: str | Path | None = None, extra_json: dict[str, dict] | None = None) -> Path:
        self.shards.flush()
        missing = self.shards.unwritten()
        if missing:
            raise RuntimeError(f"output incomplete: tensor {missing[0]} (and {len(missing) - 1} more) never written")
        self.shards.close()
        write_index(self.tmp, self.shards)
        if copy_from is not None:
            for f in COPIED_FILES:
                src = Path(copy_from) / f
                if src.exists():
                    shutil.copy2(src, self.tmp / f)
        for fname, obj in (extra_json or {}).items():
            (self.tmp / fname).write_text(json.dumps(obj, indent=2))
        try:
            self.claim.commit(self.tmp)
        finally:
            self._release()
        return self.out

    def _release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def abort(self) -> None:
        """Drop the unfinished output (idempotent)."""
        if self.shards is not None:
            self.shards.close()
        if self.claim is not None:
            self.claim.discard(self.tmp)
            self._release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
