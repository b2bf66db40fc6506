"""Static merges across the processes of a torch.distributed job: 2 gloo processes on CPU, started here with the
environment torchrun gives them. The output must be byte-identical to a one-process merge, and a process that
fails or dies must stop the others with an error and leave nothing at OUT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from blockmerge.merge.distributed import partition
from blockmerge.suite.synth import make_family


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], n: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run `python ARGS` as ranks 0..n-1 of one job (what torchrun does, without its agent restarting them)."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
        env.update(WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), BLOCKMERGE_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout.decode(), stderr.decode()))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, experts = make_family(root, "llama", n_experts=2, seed=3, dtype=torch.bfloat16)
    return root, base, experts


def write_config(root: Path, method: str, base: Path, experts: list[Path]) -> Path:
    params = {"weight": 0.7, "density": 0.5}
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": params} for e in experts],
        "parameters": {"seed": 5},
        "dtype": "bfloat16",
    }
    path = root / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_partition_is_contiguous_and_balanced():
    sizes = [50, 10, 10, 10, 10, 10, 10, 40]
    for n in (1, 2, 3, 4, 8, 11):
        parts = partition(sizes, n)
        assert len(parts) == n
        covered = [i for r in parts for i in r]
        assert covered == list(range(len(sizes)))  # every block once, in order
        loads = [sum(sizes[i] for i in r) for r in parts if len(r)]
        assert max(loads) <= sum(sizes) / min(n, len(sizes)) + max(sizes)
    assert [len(r) for r in partition([1] * 6, 2)] == [3, 3]
    assert [len(r) for r in partition([1, 1], 4)].count(0) == 2


@pytest.mark.parametrize("method", ["dare_ties"])
def test_two_processes_write_the_same_bytes_as_one(family, method, tmp_path):
    root, base, experts = family
    cfg = write_config(tmp_path, method, base, experts)
    single, multi = tmp_path / "single", tmp_path / "multi"
    cmd = ["merge", str(cfg), "--shard-size", "30KB", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "blockmerge.cli", *cmd[:2], str(single), *cmd[2:]], capture_output=True)
    assert one.returncode == 0, one.stderr.decode()
    ranks = launch(["-m", "blockmerge.cli", *cmd[:2], str(multi), *cmd[2:]])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    got, want = files(multi), files(single)
    assert len([f for f in want if f.endswith(".safetensors")]) > 2  # several shards, written by both ranks
    assert got == want
    assert not list(tmp_path.glob(".multi.*"))  # no lock or staging left behind


DRIVER = textwrap.dedent(
    """
    import os, sys
    from blockmerge.io.checkpoint import Checkpoint
    from blockmerge.merge.distributed import Group
    from blockmerge.merge.run import stream_merge

    base, expert, out, how = sys.argv[1:5]
    group = Group()
    calls = 0

    def merge_tensor(name, b, experts):
        global calls
        calls += 1
        if group.rank == 1 and calls == 3:
            if how == "die":
                os._exit(9)  # killed: no message, no cleanup
            raise ValueError(f"tensor {name}: bad numbers")
        return (b + experts[0]) / 2

    try:
        stream_merge(Checkpoint(base), [Checkpoint(expert)], out, merge_tensor, progress=False, group=group)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        group.close()
    """
)


@pytest.mark.parametrize("how", ["die", "raise"])
def test_a_failed_process_stops_the_job_and_nothing_is_committed(family, how, tmp_path):
    root, base, experts = family
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    ranks = launch([str(driver), str(base), str(experts[0]), str(out), how], timeout=90)
    rank0 = ranks[0]
    assert rank0.returncode == 1
    message = rank0.stderr.strip().splitlines()[-1]
    if how == "die":
        assert ranks[1].returncode == 9
        assert message.startswith("DistributedError: lost contact with another process"), message
    else:
        assert ranks[1].returncode == 1
        assert "another process failed (rank 1: ValueError: tensor" in message, message
        assert "bad numbers" in message
    assert "nothing committed" in message
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # rank 0 removed its staging folder and lock


def test_an_existing_out_stops_every_rank(family, tmp_path):
    root, base, experts = family
    cfg = write_config(tmp_path, "ties", base, experts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ranks = launch(["-m", "blockmerge.cli", "merge", str(cfg), str(out), "--no-progress"])
    assert all(r.returncode != 0 for r in ranks)
    for r in ranks:
        assert "output already exists" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert files(out) == {"keep.txt": b"mine"}
