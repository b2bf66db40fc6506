"""Write a sharded safetensors checkpoint tensor by tensor, in constant memory.

Every output tensor's name, shape and dtype are known before the merge starts (they are the base's),
so shards and headers are planned up front and each tensor's bytes go straight to their offset as
soon as its block is merged. Everything is written under a staging folder renamed when complete, by
the output-commit protocol below (OutputClaim), which every command that writes an output uses."""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


class OutputError(ValueError):
    """OUT cannot be written: it is an input, inside one, holds one, is a link, or is being written."""


class OutputBusyError(OutputError):
    pass


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


# ------------------------------------------------------------------------------ the output-commit protocol
# Every writer (merge, divmerge, lora, import, the suite cache) goes through OutputClaim: an exclusive lock
# beside OUT (.OUT.lock) for the whole run, refusal to write onto, into or around an input, the exists/--force
# check at the start and again at commit, a staging folder .OUT.tmp-PID renamed into place when complete,
# and recovery of what a killed run left (.OUT.tmp-PID removed, .OUT.old-PID put back or removed).

_claims: dict[Path, OutputClaim] = {}  # held by this process, by OUT's absolute path (claims nest)
_claims_guard = threading.Lock()


def _note(msg: str) -> None:
    print(f"blockmerge: {msg}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Remove an entry this protocol created (a link or file is unlinked, never followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def check_not_input(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """OUT must not be an input, lie inside one, or contain one (compared after resolving links)."""
    o = Path(os.path.realpath(out))
    for i in inputs:
        r = Path(os.path.realpath(i))
        if o == r:
            raise OutputError(f"{out}: OUT is the input {i}; write the output somewhere else")
        if r in o.parents:
            raise OutputError(f"{out}: OUT is inside the input {i}; write the output somewhere else")
        if o in r.parents:
            raise OutputError(f"{out}: OUT contains the input {i}; write the output somewhere else")


class OutputClaim:
    """This process's exclusive right to write OUT; `acquire` creates or reuses one, `release` drops it."""

    def __init__(self, out: Path, force: bool, wait: bool):
        self.out, self.force = out, force
        self.key = Path(os.path.abspath(out))
        self.lock = out.parent / f".{out.name}.lock"
        self.staged: list[Path] = []
        self.users = 0
        self._fd: int | None = None
        nearest = next(p for p in [out.parent, *out.parent.parents] if os.path.lexists(p) or p == p.parent)
        if not nearest.is_dir():
            raise OutputError(f"{out}: cannot write OUT there, {nearest} is not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        self._lock(wait)
        try:
            self._recover()
        except BaseException:
            self._unlock()
            raise

    def _lock(self, wait: bool) -> None:
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(f"{self.out}: OUT is being written by PID {pid} (lock {self.lock})") from None
            try:  # the lock file may have been removed by the previous holder after we opened it: retry
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:  # the holder's PID, for the "being written by" message of a second run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)  # while still held: the next run creates a fresh one
            os.close(self._fd)
            self._fd = None

    def _leftovers(self, kind: str) -> list[tuple[Path, int]]:
        """Entries .OUT.{kind}-PID (or -PID.N) beside OUT that this claim did not make, with their PID."""
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.{kind}-(\d+)(\.\d+)?")
        found = []
        for p in self.out.parent.glob(f".{glob.escape(self.out.name)}.{kind}-*"):
            m = pattern.fullmatch(p.name)
            if m and p not in self.staged:
                found.append((p, int(m[1])))
        return found

    def _recover(self) -> None:
        """Undo what a killed run left: an old OUT moved aside is put back if OUT is missing (killed between
        the two renames) or removed if the new OUT is in place; staging folders are removed."""
        for old, pid in self._leftovers("old"):
            if _pid_alive(pid) and pid != os.getpid():
                _note(f"{old}: left in place (PID {pid} is running)")
            elif not os.path.lexists(self.out):
                os.replace(old, self.out)
                _note(f"{self.out}: restored the previous OUT from {old.name} (a run was killed while committing)")
            else:
                _remove(old)
                _note(f"{old}: removed (the output of PID {pid} was committed; this was the OUT it replaced)")
        for tmp, pid in self._leftovers("tmp"):
            if _pid_alive(pid) and pid != os.getpid():
                _note(f"{tmp}: left in place (PID {pid} is running)")
            else:
                _remove(tmp)
                _note(f"{tmp}: removed the unfinished output of a killed run (PID {pid})")

    def check(self) -> None:
        """OUT may be written now: it does not exist, or --force was given and it is not a link."""
        if not os.path.lexists(self.out):
            return
        if not self.force:
            raise OutputExistsError(f"{self.out}: output already exists (use --force to overwrite)")
        if self.out.is_symlink():
            raise OutputError(
                f"{self.out}: OUT is a symbolic link (to {os.readlink(self.out)}); give the folder itself, "
                "or remove the link"
            )

    def staging(self) -> Path:
        """A fresh empty staging folder beside OUT (.OUT.tmp-PID, then -PID.2, ... within one process)."""
        tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        n = 1
        while tmp in self.staged or os.path.lexists(tmp):
            n += 1
            tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}.{n}"
        tmp.mkdir()
        self.staged.append(tmp)
        return tmp

    def discard(self, staged: Path) -> None:
        if staged in self.staged:
            self.staged.remove(staged)
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path) -> Path:
        """Swap the finished folder (from `staging()`, or one the caller built beside OUT) into place. The
        exists/--force check is repeated first (something may have appeared at OUT meanwhile); only with
        --force is the OUT found here replaced, and only this process's own entries are ever removed."""
        try:
            self.check()
        except OutputExistsError:
            self.discard(staged)
            raise OutputExistsError(
                f"{self.out}: OUT appeared while this run was writing it; left as it is and the new output "
                "discarded (use --force to overwrite)"
            ) from None
        except OutputError:
            self.discard(staged)
            raise
        old = None
        if os.path.lexists(self.out):
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(staged, self.out)
        except BaseException:
            if old is not None:
                os.replace(old, self.out)
            raise
        if staged in self.staged:
            self.staged.remove(staged)
        if old is not None:
            _remove(old)
        return self.out

    def release(self) -> None:
        with _claims_guard:
            self.users -= 1
            if self.users > 0:
                return
            _claims.pop(self.key, None)
        for tmp in list(self.staged):
            self.discard(tmp)
        self._unlock()


def acquire_output(
    out: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = (), wait: bool = False
) -> OutputClaim:
    """Claim OUT for this run (call `release()` when done; `claim_output` does both). A claim this process
    already holds on OUT is shared. `inputs`: paths OUT must not be, lie in or contain. `wait`: block on
    another process's lock instead of failing (caches)."""
    out = Path(out)
    check_not_input(out, inputs)
    key = Path(os.path.abspath(out))
    with _claims_guard:
        claim = _claims.get(key)
        if claim is None:
            claim = _claims[key] = OutputClaim(out, force, wait)
        claim.users += 1
    try:
        claim.check()
    except BaseException:
        claim.release()
        raise
    return claim


@contextmanager
def claim_output(
    out: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = (), wait: bool = False
) -> Iterator[OutputClaim]:
    """with claim_output(out, force=..., inputs=[...]) as claim: ... tmp = claim.staging() ... claim.commit(tmp)"""
    claim = acquire_output(out, force=force, inputs=inputs, wait=wait)
    try:
        yield claim
    finally:
        claim.release()


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


class CheckpointWriter:
    """with CheckpointWriter(out, [(name, shape, dtype), ...]) as w: w.write(name, t) ...; w.finish(base_dir)

    Holds a claim on OUT (lock, checks, staging folder) from construction to `finish` (commit) or `abort`;
    `inputs` are the paths read to make the output (OUT may not be, lie in or contain one of them)."""

    def __init__(
        self,
        out: str | Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_size: int | str = "5GB",
        force: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: Sequence[str | Path] = (),
    ):
        limit = parse_size(shard_size)  # before anything exists on disk
        self.slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        self.claim = acquire_output(out, force=force, inputs=inputs)
        self.out = self.claim.out
        try:
            self.tmp = self.claim.staging()
        except BaseException:
            self.claim.release()
            raise
        try:
            self._plan(tensors, limit, metadata or {"format": "pt"})
        except BaseException:
            self.abort()
            raise

    def _plan(self, tensors: list, limit: int, metadata: dict[str, str]) -> None:
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
            self._plan_shard(fname, shard, metadata)

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
        try:
            self.claim.commit(self.tmp)
        finally:
            self._release()
        return self.out

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def abort(self) -> None:
        """Drop the unfinished output (idempotent)."""
        self._close()
        if self.claim is not None:
            self.claim.discard(self.tmp)
            self._release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
