"""Triton-interpreter tests (marker `interp`) need TRITON_INTERPRET=1 before triton is first imported, so a
normal session deselects them and tests/test_kernels.py runs them in a child pytest that has it set."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    drop = [it for it in items if it.get_closest_marker("interp")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if not it.get_closest_marker("interp")]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only cost time (a lot on a busy CPU). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def private_blockmerge_cache(tmp_path_factory):
    """Learners cache teacher passes under $BLOCKMERGE_CACHE by default: never the user's cache in tests."""
    previous = os.environ.get("BLOCKMERGE_CACHE")
    os.environ["BLOCKMERGE_CACHE"] = str(tmp_path_factory.mktemp("blockmerge-cache"))
    yield
    if previous is None:
        os.environ.pop("BLOCKMERGE_CACHE", None)
    else:
        os.environ["BLOCKMERGE_CACHE"] = previous
