"""Where blockmerge keeps what it can reuse across runs (the built-in suite, teacher passes)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache() -> Path:
    """$BLOCKMERGE_CACHE, else ~/.cache/blockmerge."""
    env = os.environ.get("BLOCKMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blockmerge"


def teacher_cache() -> Path:
    """Default folder of the teacher passes of `blockmerge divmerge` and `blockmerge lora divmerge`."""
    return default_cache() / "teacher"
