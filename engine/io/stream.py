"""Block streaming: hold one block of every model, plus the next block being read by a background
thread, so peak memory depends on the largest block, never on the number of layers. `BlockSource`
keeps as many blocks resident as a memory budget allows and streams the rest."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Block, Checkpoint

BlockTensors = list[dict[str, torch.Tensor]]  # one {tensor name: tensor} per model, in model order


def read_block(models: Sequence[Checkpoint], block: Block, device: str | torch.device = "cpu") -> BlockTensors:
    out = []
    for m in models:
        tensors = {name: m.get(name).to(device, non_blocking=True) for name in block.tensors}
        m.release()  # drop the mapping: pages read so far leave this process's RSS (they stay in page cache)
        out.append(tensors)
    return out


def stream_blocks(
    models: Sequence[Checkpoint],
    blocks: Sequence[Block] | None = None,
    device: str | torch.device = "cpu",
    prefetch: bool = True,
) -> Iterator[tuple[Block, BlockTensors]]:
    """Yield (block, tensors of every model) in block order, reading block i+1 while block i is used."""
    blocks = list(blocks if blocks is not None else models[0].blocks())
    if not prefetch:
        for b in blocks:
            yield b, read_block(models, b, device)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockmerge-prefetch") as pool:
        pending = pool.submit(read_block, models, blocks[0], device) if blocks else None
        for i, b in enumerate(blocks):
            current = pending.result()
            pending = pool.submit(read_block, models, blocks[i + 1], device) if i + 1 < len(blocks) else None
            yield b, current
            del current


def parse_memory(value: int | str | None, field: str = "memory") -> int | None:
    """Bytes of a memory budget given as an int or as '8GiB', '512MiB', '2GB', '0' (None stays None)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{field}: {value!r} is not a memory size (expected bytes or e.g. 8GiB, 512MiB, 2GB)")
    unit = (m.group(2) or "B").upper().removesuffix("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}
    scale["TI"] = 1 << 40
    return int(float(m.group(1)) * scale[unit])


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free bytes on the device: CUDA's free memory, else the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(memory: int | str | None, device: str | torch.device = "cpu", field: str = "memory") -> int:
    """Bytes of blocks that may stay resident: `memory` as given, by default half of what the device has
    free (the rest is for activations, the streamed blocks and everything else)."""
    parsed = parse_memory(memory, field)
    return available_memory(device) // 2 if parsed is None else parsed


class BlockSource:
    """Blocks of several checkpoints (one {name: tensor} dict per checkpoint per block). Blocks are kept
    in memory on `device` after their first read while all kept blocks fit in `resident_max_bytes`
    (optionally converted once to `dtype`); the others are read on demand, streamed with prefetch. `only`:
    the names of the blocks that may be kept (default all; a pipeline stage keeps its own)."""

    def __init__(
        self,
        ckpts: Sequence[Checkpoint],
        device="cpu",
        resident_max_bytes: int = 0,
        prefetch=True,
        dtype: torch.dtype | None = None,
        only: Collection[str] | None = None,
    ):
        self.ckpts = list(ckpts)
        self.device = device
        self.prefetch = prefetch
        self.dtype = dtype
        self.kept: set[str] = set()
        self.resident_bytes = 0
        blocks = [b for b in self.ckpts[0].blocks() if only is None or b.name in only]
        for b in blocks:  # every block that fits (the big embedding may not while the layers do)
            n = sum(self._stored_bytes(c.tensors[t]) for c in self.ckpts for t in b.tensors)
            if self.resident_bytes + n <= resident_max_bytes:
                self.kept.add(b.name)
                self.resident_bytes += n
        self.resident = len(self.kept) == len(blocks)
        self._mem: dict[str, BlockTensors] = {}

    def _stored_bytes(self, info) -> int:
        if self.dtype is None or not info.dtype.is_floating_point:
            return info.nbytes
        return info.nbytes // info.dtype.itemsize * self.dtype.itemsize

    def _read(self, block: Block) -> BlockTensors:
        tensors = read_block(self.ckpts, block, self.device)
        if self.dtype is None:
            return tensors
        return [{k: v.to(self.dtype) if v.is_floating_point() else v for k, v in t.items()} for t in tensors]

    def read(self, block: Block) -> BlockTensors:
        if block.name not in self.kept:
            return self._read(block)
        if block.name not in self._mem:
            self._mem[block.name] = self._read(block)
        return self._mem[block.name]

    def stream(self, blocks: Sequence[Block]) -> Iterator[tuple[Block, BlockTensors]]:
        """(block, tensors) in the given order; the blocks that are not kept are read ahead by a thread."""
        streamed = [b for b in blocks if b.name not in self.kept]
        ahead = stream_blocks(self.ckpts, streamed, self.device, prefetch=self.prefetch) if streamed else None
        for b in blocks:
            if b.name in self.kept:
                yield b, self.read(b)
                continue
            _, tensors = next(ahead)
            if self.dtype is not None:
                tensors = [{k: v.to(self.dtype) if v.is_floating_point() else v for k, v in t.items()} for t in tensors]
            yield b, tensors
