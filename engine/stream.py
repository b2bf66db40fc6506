"""Block streaming: hold one block of every model, plus the next block being read by a background
thread, so peak memory depends on the largest block, never on the number of layers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .checkpoint import Block, Checkpoint

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
