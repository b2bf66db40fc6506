"""Progress bars, the memory figures every command reports, and result tables written as CSV."""

from __future__ import annotations

import csv
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


def peak_gpu_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def progress(total: int, desc: str, unit: str = "block", disable: bool = False) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable, file=sys.stderr)


def final_line(what: str, started: float, extra: str = "") -> str:
    gpu = peak_gpu_bytes()
    line = f"{what} in {time.perf_counter() - started:.1f}s, peak RSS {gib(peak_rss_bytes())}"
    if gpu:
        line += f", peak GPU {gib(gpu)}"
    return line + (f", {extra}" if extra else "")


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """Rows of one table as CSV (columns: `fields`, default the first row's keys), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
