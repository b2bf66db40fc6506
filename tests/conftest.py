"""Triton-interpreter tests (marker `interp`) need TRITON_INTERPRET=1 before triton is first imported, so a
normal session deselects them and tests/test_kernels.py runs them in a child pytest that has it set."""

from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    drop = [it for it in items if it.get_closest_marker("interp")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if not it.get_closest_marker("interp")]
