"""A static merge shared by the processes of a torch.distributed job (torchrun, accelerate launch).

    torchrun --nproc-per-node 4 $(which blockmerge) merge CONFIG.yml OUT
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 $(which blockmerge) merge ...

Every process plans the same output shards (a pure function of the base's tensors and the shard size) and
merges a contiguous range of blocks, balanced by bytes. Rank 0 claims OUT (lock, exists/--force, never over
an input), creates the staging folder and the shard files with their headers; every rank writes its tensors
at their planned offsets; when every rank has reported success, rank 0 writes the index and config files and
commits. No tensor crosses processes (DARE's mask depends on the seed and the tensor's name only), so the
files are byte-identical to a one-process merge. Only small control messages are exchanged, over gloo. The
staging folder must be on a filesystem every process sees (one machine, or a shared filesystem across
nodes). A process that fails or dies makes the others stop with an error; nothing is committed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from blockmerge.io.writer import CheckpointWriter, ShardFiles, parse_size, plan_shards

TIMEOUT_ENV = "BLOCKMERGE_DIST_TIMEOUT"  # seconds a process waits for the others (default 1800)


class DistributedError(RuntimeError):
    """Another process of the job failed or died; this one stops without committing anything."""


def in_job() -> bool:
    """Launched as one of several processes (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Group:
    """This process's place in the job: rank, size, and the gloo group control messages travel on."""

    def __init__(self) -> None:
        self.owned = not dist.is_initialized()
        if self.owned:
            timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            dist.init_process_group("gloo", timeout=timeout)
        # a job already set up with NCCL gets a gloo group for the control messages (Python objects)
        self.pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def device(self, device: torch.device) -> torch.device:
        """`cuda` without an index means this process's GPU (LOCAL_RANK), as torchrun lays them out."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return device

    def share(self, sizes: Sequence[int]) -> range:
        """The contiguous range of items (blocks, by their bytes) this process handles."""
        return partition(sizes, self.size)[self.rank]

    def gather(self, obj) -> list:
        out = [None] * self.size
        self.call(dist.all_gather_object, out, obj, group=self.pg)
        return out

    def broadcast(self, obj):
        box = [obj]
        self.call(dist.broadcast_object_list, box, src=0, group=self.pg)
        return box[0]

    def call(self, fn, *args, **kw):
        """fn(*args, **kw) (a collective or point-to-point operation, or a wait); a peer that died or timed out
        becomes a DistributedError."""
        try:
            return fn(*args, **kw)
        except (RuntimeError, dist.DistBackendError) as e:  # a peer died or timed out
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"lost contact with another process of the job ({reason}); nothing committed") from e

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def partition(sizes: Sequence[int], n: int) -> list[range]:
    """Split items into n contiguous ranges of about equal total size: an item goes to the range its middle
    byte falls in (some ranges are empty when there are fewer items than ranges)."""
    total = max(sum(sizes), 1)
    owner, pos = [], 0
    for s in sizes:
        owner.append(min(n - 1, int((pos + s / 2) * n / total)))
        pos += s
    return [range(owner.index(r), len(owner) - owner[::-1].index(r)) if r in owner else range(0) for r in range(n)]


class DistributedWriter:
    """CheckpointWriter's interface for one process of a job: rank 0 holds the real writer (claim, staging,
    commit); the other ranks open the shard files it created and write their tensors into them."""

    def __init__(
        self,
        group: Group,
        out: str | Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_size: int | str = "5GB",
        force: bool = False,
        inputs: Sequence[str | Path] = (),
        write_behind: int = 0,
    ):
        self.group, self.writer, self.shards, self.reported = group, None, None, False
        started = None
        if group.rank == 0:
            try:
                self.writer = CheckpointWriter(
                    out, tensors, shard_size=shard_size, force=force, inputs=inputs, write_behind=write_behind
                )
                started = ("ok", str(self.writer.tmp))
            except Exception as e:
                group.broadcast(("error", str(e)))
                raise
        status, value = group.broadcast(started)
        if group.rank == 0:
            self.shards = self.writer.shards
            return
        if status != "ok":
            raise DistributedError(f"rank 0 could not start the output: {value}")
        plan = plan_shards(tensors, parse_size(shard_size), {"format": "pt"})
        self.shards = ShardFiles(Path(value), plan, create=False, behind=write_behind)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.write(name, tensor)

    def _report(self, outcome) -> list:
        self.reported = True
        return self.group.gather(outcome)

    def finish(self, copy_from: str | Path | None = None, extra_json: dict[str, dict] | None = None) -> Path:
        self.shards.flush()
        written = [n for n, s in self.shards.slots.items() if s.written]
        self.shards.close()
        outcomes = self._report(("ok", written))
        failed = [f"rank {r}: {v}" for r, (status, v) in enumerate(outcomes) if status != "ok"]
        if failed:
            raise DistributedError(f"another process failed ({failed[0]}); nothing committed")
        result = None
        if self.group.rank == 0:
            for _, names in outcomes:
                for n in names:
                    self.shards.slots[n].written = True
            try:
                result = ("ok", str(self.writer.finish(copy_from=copy_from, extra_json=extra_json)))
            except Exception as e:
                self.group.broadcast(("error", str(e)))
                raise
        status, value = self.group.broadcast(result)
        if status != "ok":
            raise DistributedError(f"rank 0 could not commit the output: {value}")
        return Path(value)

    def abort(self, reason: str = "failed") -> None:
        """Tell the others this process failed (if it has not reported yet), then drop what it holds."""
        self.shards.close()
        try:
            if not self.reported:
                self._report(("error", reason))
        except DistributedError:
            pass  # the others are gone already
        finally:
            if self.writer is not None:
                self.writer.abort()

    def __enter__(self) -> DistributedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None or not self.reported:  # after a commit there is nothing left to drop
            self.abort(f"{type(exc).__name__}: {exc}".splitlines()[0] if exc is not None else "stopped early")
