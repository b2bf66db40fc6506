"""The output-commit protocol that every command writing an output goes through (merge, divmerge, lora,
import-gguf, the suite and teacher caches): an exclusive lock beside OUT (.OUT.lock) for the whole run,
refusal to write onto, into or around an input, the exists/--force check at the start and again at commit,
a staging folder .OUT.tmp-PID renamed into place when complete, and recovery of what a killed run left
(.OUT.tmp-PID removed, .OUT.old-PID put back or removed)."""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


class OutputError(ValueError):
    """OUT cannot be written: it is an input, inside one, holds one, is a link, or is being written."""


class OutputBusyError(OutputError):
    pass


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
