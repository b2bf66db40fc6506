"""Hostile and careless input through the CLI (issue 12): every case gives one line
`blockmerge COMMAND: error: ...` and exit 1 or 2 (or the correct result), no traceback, nothing left beside OUT,
inputs unchanged (sha256) and an existing OUT intact. Grouped by what used to go wrong: data lost, silent wrong
results, tracebacks, leftovers. The CLI runs in-process; a subprocess only where the case needs one (a second
process holding OUT, kill -9, a crash between the two final renames).

Permissions: these tests run as root, which ignores file modes, so "permission denied" is simulated by
monkeypatching os.mkdir / os.replace to raise PermissionError, and a full disk by making os.pwrite raise
OSError(ENOSPC); an unusable OUT folder is a path whose parent is a regular file."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from blockmerge.cli import main
from blockmerge.suite.synth import make_family
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TARGET = "model.layers.1.self_attn.q_proj"  # the module the hand-written adapters adapt


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    make_family(root, "llama", n_experts=2, seed=5)
    for i, scale in enumerate((1.0, -0.5)):  # two LoRA adapters of rank 2 on one module, written by hand
        A = torch.randn(2, 48, generator=torch.Generator().manual_seed(i)) * 0.1
        B = torch.randn(48, 2, generator=torch.Generator().manual_seed(10 + i)) * scale
        write_adapter(root / f"ad{i}", A, B)
    prompts = [{"input_ids": [3, 4, 5, 6]}, {"input_ids": [7, 8, 9]}]
    (root / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def write_adapter(d: Path, A: torch.Tensor, B: torch.Tensor) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(
        {f"base_model.model.{TARGET}.lora_A.weight": A, f"base_model.model.{TARGET}.lora_B.weight": B},
        str(d / "adapter_model.safetensors"),
    )
    return d


@pytest.fixture
def work(family, tmp_path):
    """A fresh copy of the inputs, an empty folder for outputs, and the inputs' hashes."""
    ins = tmp_path / "in"
    shutil.copytree(family, ins)
    outs = tmp_path / "outs"
    outs.mkdir()
    return ins, outs, tree_hash(ins)


def tree_hash(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged(ins: Path, before: dict[str, str]) -> None:
    """Every input file is still there, byte for byte (files the test added, such as configs, aside)."""
    now = tree_hash(ins)
    assert {k: now.get(k) for k in before} == before


def cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def fails(argv, capsys, needle: str, rc: int = 2) -> str:
    """The command fails with exit code `rc` and exactly one error line, which contains `needle`."""
    code, err = cli(argv, capsys)
    cmd = next(a for a in map(str, argv) if a in ("merge", "divmerge", "lora"))
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert code == rc, err
    assert len(lines) == 1 and lines[0].startswith(f"blockmerge {cmd}: error: "), err
    assert needle in lines[0], err
    return lines[0]


def clean(outs: Path, *keep: str) -> None:
    """Nothing but `keep` in the output folder: no .OUT.tmp-PID, .OUT.old-PID or .OUT.lock."""
    assert sorted(p.name for p in outs.iterdir()) == sorted(keep)


def ties_yaml(ins: Path, **params) -> Path:
    cfg = {
        "merge_method": "ties",
        "base_model": str(ins / "base"),
        "models": [{"model": str(ins / f"expert{i}"), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)],
        "parameters": params,
    }
    p = ins / "ties.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def old_out(outs: Path) -> tuple[Path, dict]:
    """An existing OUT with a file that must survive."""
    out = outs / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out, tree_hash(out)


def load_all(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def child(code: str) -> subprocess.Popen:
    """A Python child running `code` with this worktree's package (stdout piped, line by line)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ data lost


def test_out_appearing_during_a_run_is_kept(work, capsys, monkeypatch):
    """A folder created at OUT while a merge without --force runs is left alone; the new output is dropped."""
    import blockmerge.io.writer as W

    ins, outs, before = work
    out = outs / "m"
    finish = W.CheckpointWriter.finish

    def appear_then_finish(self, *a, **kw):
        out.mkdir()
        (out / "keep.txt").write_text("someone else's")
        return finish(self, *a, **kw)

    monkeypatch.setattr(W.CheckpointWriter, "finish", appear_then_finish)
    fails(["merge", ties_yaml(ins), out, "--no-progress"], capsys, "OUT appeared while this run was writing it")
    assert (out / "keep.txt").read_text() == "someone else's"
    clean(outs, "m")
    unchanged(ins, before)


def test_second_run_into_the_same_out_is_refused(work, capsys):
    """While another process writes OUT (holds its lock), a second run fails naming that process."""
    ins, outs, before = work
    out = outs / "m"
    holder = child(
        "import time; from blockmerge.io.commit import acquire_output\n"
        f"c = acquire_output({str(out)!r}); print('locked', flush=True); time.sleep(60)"
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(["merge", ties_yaml(ins), out, "--no-progress"], capsys, f"is being written by PID {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli(["merge", ties_yaml(ins), out, "--no-progress"], capsys)[0] == 0  # the lock died with it
    clean(outs, "m")


def test_lora_merge_never_guesses_out(work, capsys):
    """One weight fewer than adapters (or OUT after --adapters) used to turn the last adapter into OUT."""
    ins, outs, before = work
    ads = [ins / "ad0", ins / "ad1"]
    fails(["lora", "merge", "--adapters", *ads, "--weights", "1", "--force"], capsys, "OUT is missing")
    fails(["lora", "merge", "--adapters", *ads, outs / "o", "--force"], capsys, "OUT is missing")
    fails(["lora", "merge-into-base", "--base", ins / "base", "--adapters", *ads, "--force"], capsys, "OUT is missing")
    unchanged(ins, before)
    clean(outs)
    assert cli(["lora", "merge", "--adapters", *ads, "--weights", "1", "1", "--out", outs / "o"], capsys)[0] == 0
    clean(outs, "o")


@pytest.mark.parametrize("where", ["expert", "inside", "contains", "config"])
def test_out_onto_or_around_an_input_is_refused(work, capsys, where):
    ins, outs, before = work
    cfg = ties_yaml(ins)
    before = tree_hash(ins)
    out, needle = {
        "expert": (ins / "expert1", "OUT is the input"),
        "inside": (ins / "base" / "merged", "OUT is inside the input"),
        "contains": (ins, "OUT contains the input"),
        "config": (cfg, "OUT is the input"),
    }[where]
    fails(["merge", cfg, out, "--force", "--no-progress"], capsys, needle)
    unchanged(ins, before)
    if where != "config":  # the same for adapters, with an adapter as OUT
        ads = [ins / "ad0", ins / "ad1"]
        out = {"expert": ads[1], "inside": ads[0] / "merged"}.get(where, out)
        fails(["lora", "merge", out, "--adapters", *ads, "--force"], capsys, needle)
        unchanged(ins, before)
    assert not list(ins.rglob(".*")) and not list(ins.parent.glob(".*"))


# --------------------------------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize(
    "method,where,value,needle",
    [
        ("ties", "weight", math.nan, "models.0.parameters.weight: nan for tensor"),
        ("ties", "weight", math.inf, "models.0.parameters.weight: inf for tensor"),
        ("ties", "lambda", math.nan, "parameters.lambda: nan for tensor"),
        ("ties", "density", 0.0, "models.0.parameters.density: 0.0"),
        ("slerp", "t", math.inf, "parameters.t: inf for tensor"),
        ("slerp", "t", 1.5, "expected 0 <= t <= 1 (--extrapolate to go beyond)"),
    ],
)
def test_nonfinite_or_out_of_range_merge_parameters(work, capsys, method, where, value, needle):
    ins, outs, before = work
    models = [{"model": str(ins / f"expert{i}"), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]
    params = {}
    if method == "slerp":
        models, params = [{"model": str(ins / "base")}, {"model": str(ins / "expert0")}], {"t": value}
    elif where == "lambda":
        params = {"lambda": value}
    else:
        models[0]["parameters"][where] = value
    cfg = ins / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(ins / "base"), "models": models,
                                   "parameters": params}))  # fmt: skip
    fails(["merge", cfg, outs / "m", "--no-progress"], capsys, needle)
    clean(outs)


def test_slerp_extrapolation_when_asked(work, capsys):
    """t outside [0, 1] with --extrapolate: the slerp formula evaluated there (checked in float64)."""
    ins, outs, _ = work
    cfg = ins / "s.yml"
    models = [{"model": str(ins / "base")}, {"model": str(ins / "expert0")}]
    cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(ins / "base"), "models": models,
                                   "parameters": {"t": 1.25}, "dtype": "float32"}))  # fmt: skip
    assert cli(["merge", cfg, outs / "m", "--extrapolate", "--no-progress"], capsys)[0] == 0
    got, a, b = load_all(outs / "m"), load_all(ins / "base"), load_all(ins / "expert0")
    name = "model.layers.2.mlp.up_proj.weight"
    x, y = a[name].double().reshape(-1), b[name].double().reshape(-1)
    th = math.acos(float(x @ y / (x.norm() * y.norm())))
    ref = (math.sin((1 - 1.25) * th) * x + math.sin(1.25 * th) * y) / math.sin(th)
    torch.testing.assert_close(got[name].double().reshape(-1), ref, atol=1e-6, rtol=1e-5)


def test_nonfinite_lora_numbers(work, capsys):
    ins, outs, before = work
    ads = [ins / "ad0", ins / "ad1"]
    with pytest.raises(SystemExit) as e:  # argparse: one usage line and one error line, exit 2
        main(["lora", "merge", str(outs / "o"), "--adapters", *map(str, ads), "--weights", "nan", "1"])
    assert e.value.code == 2 and "'nan' is not a finite number" in capsys.readouterr().err
    for density in ("0", "0.0"):  # DARE divides by the density
        fails(["lora", "merge", outs / "o", "--adapters", *ads, "--method", "dare_linear", "--density", density],
              capsys, "--density must be in (0, 1] for dare_linear")  # fmt: skip
    clean(outs)
    unchanged(ins, before)


def divmerge_yaml(ins: Path, data: Path | None = None, **settings) -> Path:
    cfg = {
        "base_model": str(ins / "base"),
        "models": [{"model": str(ins / f"expert{i}"), "data": str(data or ins / "data.jsonl")} for i in range(2)],
        **settings,
    }
    p = ins / "d.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"init": math.nan}, "field init: Input should be a finite number"),
        ({"lr": math.inf}, "field lr: Input should be a finite number"),
        ({"steps": 0}, "field steps: Input should be greater than or equal to 1"),
        ({"samples": 3}, "samples is 3 but"),
    ],
)
def test_divmerge_settings(work, capsys, settings, needle):
    ins, outs, _ = work
    fails(["divmerge", divmerge_yaml(ins, **settings), outs / "m"], capsys, needle)
    clean(outs)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_divmerge_steps_below_one(work, capsys, steps):
    """--steps 0 used to run nothing, record empty losses and crash printing the summary (progress on)."""
    ins, outs, _ = work
    fails(["divmerge", divmerge_yaml(ins), outs / "m", "--steps", steps], capsys, f"--steps: {steps}, expected")
    clean(outs)


@pytest.mark.parametrize(
    "ids,needle",
    [
        ([3, -1, 4], "token id -1 outside the vocabulary [0, 97)"),
        ([3, 97], "token id 97 outside the vocabulary [0, 97)"),
        ([3, True], "input_ids must be a non-empty list of ints"),
        ([3, 4.0], "input_ids must be a non-empty list of ints"),
    ],
)
def test_divmerge_token_ids(work, capsys, ids, needle):
    ins, outs, _ = work
    data = ins / "bad.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": ids}) + "\n")
    line = fails(["divmerge", divmerge_yaml(ins, data), outs / "m"], capsys, needle)
    assert f"{data}:2" in line
    clean(outs)


def test_nonfinite_input_tensor(work, capsys):
    """NaN in an expert: an error naming the model and the tensor; --allow-nonfinite merges it anyway."""
    ins, outs, before = work
    name = "model.layers.1.mlp.down_proj.weight"
    shard = next(f for f in (ins / "expert1").glob("*.safetensors") if name in load_file(f))
    sd = load_file(shard)
    sd[name][3, 4] = math.nan
    save_file(sd, str(shard), metadata={"format": "pt"})
    cfg = ties_yaml(ins)
    fails(["merge", cfg, outs / "m", "--no-progress"], capsys, f"{ins / 'expert1'}: tensor {name} contains NaN")
    clean(outs)
    assert cli(["merge", cfg, outs / "m", "--no-progress", "--allow-nonfinite"], capsys)[0] == 0
    assert torch.isnan(load_all(outs / "m")[name]).any()
    assert "BLOCKMERGE_ALLOW_NONFINITE" not in os.environ  # the option does not outlive the command
    # the same in a LoRA factor, and an SVD of an Inf update is an error, not a traceback
    write_adapter(ins / "inf", torch.full((2, 48), math.inf), torch.ones(48, 2))
    fails(["lora", "merge", outs / "a", "--adapters", ins / "ad0", ins / "inf"], capsys,
          f"tensor {TARGET}.lora_A contains Inf")  # fmt: skip
    fails(["lora", "merge", outs / "a", "--adapters", ins / "ad0", ins / "inf", "--allow-nonfinite"], capsys,
          f"module {TARGET}: the combined update has NaN/Inf values")  # fmt: skip
    clean(outs, "m")


# ------------------------------------------------------------------------------------------------- tracebacks


def test_permission_denied_creating_the_staging_folder(work, capsys, monkeypatch):
    ins, outs, before = work
    mkdir = os.mkdir

    def denied(path, *a, **kw):
        if Path(path).parent == outs:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", denied)
    fails(["merge", ties_yaml(ins), outs / "m", "--no-progress"], capsys, "Permission denied", rc=1)
    clean(outs)


def test_permission_denied_at_commit_keeps_the_old_out(work, capsys, monkeypatch):
    ins, outs, _ = work
    out, kept = old_out(outs)
    replace = os.replace

    def denied(src, dst, *a, **kw):
        if Path(src).name.startswith(".m.tmp-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", denied)
    fails(["merge", ties_yaml(ins), out, "--force", "--no-progress"], capsys, "Permission denied", rc=1)
    assert tree_hash(out) == kept
    clean(outs, "m")


def test_out_folder_under_a_regular_file(work, capsys):
    ins, outs, _ = work
    (outs / "file").write_text("not a folder")
    fails(["merge", ties_yaml(ins), outs / "file" / "m", "--no-progress"], capsys, "file is not a folder")
    clean(outs, "file")


def test_disk_full_keeps_the_old_out(work, capsys, monkeypatch):
    import blockmerge.io.writer as W

    ins, outs, _ = work
    out, kept = old_out(outs)

    pwrite = os.pwrite

    def full(fd, data, offset):
        if len(data) > 64:  # tensor data (the PID in the lock file still fits)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(W.os, "pwrite", full)
    fails(["merge", ties_yaml(ins), out, "--force", "--no-progress"], capsys, "No space left on device", rc=1)
    assert tree_hash(out) == kept
    clean(outs, "m")


def test_out_symlink_with_force(work, capsys):
    ins, outs, _ = work
    target, kept = old_out(outs)
    (outs / "link").symlink_to(target)
    fails(["merge", ties_yaml(ins), outs / "link", "--force", "--no-progress"], capsys, "is a symbolic link")
    assert (outs / "link").is_symlink() and tree_hash(target) == kept
    clean(outs, "m", "link")


@pytest.mark.parametrize("device", ["tpu", "cuda:99" if torch.cuda.is_available() else "cuda", "gpu0"])
def test_bad_device(work, capsys, device):
    ins, outs, _ = work
    fails(["merge", ties_yaml(ins), outs / "m", "--device", device], capsys, f"device {device!r}")
    fails(["divmerge", divmerge_yaml(ins), outs / "m", "--device", device], capsys, f"device {device!r}")
    fails(["lora", "merge-into-base", outs / "m", "--base", ins / "base", "--adapters", ins / "ad0", "--device",
           device], capsys, f"device {device!r}")  # fmt: skip
    clean(outs)


@pytest.mark.parametrize("size", ["infGB", "nanMB", "0", "-5GB", "lots"])
def test_bad_shard_size_leaves_nothing(work, capsys, size):
    ins, outs, _ = work
    fails(["merge", ties_yaml(ins), outs / "m", f"--shard-size={size}"], capsys, f"shard size {size!r}")
    clean(outs)


@pytest.mark.parametrize("weight_map", [[1, 2], "model.safetensors", {"a": 3}])
def test_bad_index_weight_map(work, capsys, weight_map):
    ins, outs, _ = work
    index = ins / "expert0" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    fails(["merge", ties_yaml(ins), outs / "m", "--no-progress"], capsys, f"{index}:")
    clean(outs)


def test_unexpected_failure_one_line_or_traceback_with_debug(work, capsys, monkeypatch):
    import blockmerge.merge.run as M

    ins, outs, _ = work

    def broken(*a, **kw):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(M, "stream_merge", broken)
    fails(["merge", ties_yaml(ins), outs / "m"], capsys, "RuntimeError: something inside broke", rc=1)
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["--debug", "merge", str(ties_yaml(ins)), str(outs / "m")])
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["merge", str(ties_yaml(ins)), str(outs / "m"), "--debug"])
    clean(outs)


# -------------------------------------------------------------------------------------------------- leftovers


MERGE_CHILD = """
import os, sys, time
import blockmerge.merge.run as M
from blockmerge.cli import main
mode, cfg, out = {args}
if mode == "kill":  # announce the first written block, then wait to be killed
    fn = M.stream_merge
    def slow(*a, **kw):
        merge_tensor = a[3]
        def announce(name, b, ex):
            if "layers.1" in name:
                print("writing", flush=True)
                time.sleep(60)
            return merge_tensor(name, b, ex)
        return fn(*a[:3], announce, *a[4:], **kw)
    M.stream_merge = slow
else:  # die between the two renames of the commit
    replace = os.replace
    def crash(src, dst):
        if ".tmp-" in os.path.basename(src):
            os._exit(137)
        return replace(src, dst)
    os.replace = crash
sys.exit(main(["merge", cfg, out, "--force", "--no-progress"]))
"""


def merge_child(mode: str, cfg: Path, out: Path) -> subprocess.Popen:
    return child(MERGE_CHILD.replace("{args}", repr((mode, str(cfg), str(out)))))


def test_killed_merge_leftovers_removed_at_the_next_run(work, capsys):
    ins, outs, before = work
    out, kept = old_out(outs)
    cfg = ties_yaml(ins)
    proc = merge_child("kill", cfg, out)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (outs / f".m.tmp-{proc.pid}").is_dir() and tree_hash(out) == kept  # what kill -9 leaves
    code, err = cli(["merge", cfg, out, "--force", "--no-progress"], capsys)
    assert code == 0 and f"removed the unfinished output of a killed run (PID {proc.pid})" in err
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    clean(outs, "m")
    unchanged(ins, before)


def test_crash_between_the_two_renames_is_recovered(work, capsys):
    ins, outs, before = work
    out, kept = old_out(outs)
    cfg = ties_yaml(ins)
    proc = merge_child("crash", cfg, out)
    assert proc.wait() == 137
    assert not out.exists() and (outs / f".m.old-{proc.pid}").is_dir()  # OUT moved aside, new one not in place
    # the next run puts the old OUT back first; without --force it then refuses to replace it
    fails(["merge", cfg, out, "--no-progress"], capsys, "output already exists")
    assert tree_hash(out) == kept
    clean(outs, "m")
    unchanged(ins, before)


@pytest.mark.parametrize(
    "cache,fail_times,warned",
    [("poisoned", 1, 0), ("poisoned", 2, 1), ("unwritable", 0, 0)],
    ids=["rebuilt", "eager", "unwritable"],
)
def test_compiler_cache_poisoned_or_unwritable(tmp_path, monkeypatch, cache, fail_times, warned):
    """A compile that fails (as with a 0-byte .so in Inductor's cache) is retried once with a fresh cache
    directory; only if that fails too does the process fall back to eager, with one warning. A cache
    directory that cannot be written (here a regular file in its place) is replaced before the first compile.
    (torch.compile is replaced by a stand-in that fails `fail_times` times, then returns the formula.)"""
    import blockmerge.kernels.compiled as C
    from blockmerge.kernels import combine_torch

    b, es = torch.randn(64), [torch.randn(64), torch.randn(64)]
    ref = combine_torch(b, es, [0.3, 0.6])
    bad = tmp_path / "inductor"
    bad.mkdir() if cache == "poisoned" else bad.write_text("not a folder")
    monkeypatch.setattr(C, "_compiled", {})
    monkeypatch.setattr(C, "_broken", None)
    monkeypatch.setattr(C, "_fresh_cache_dir", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(bad))
    calls = []

    def fake_compile(fn, **kw):
        def run(*a, **k):
            calls.append(os.environ["TORCHINDUCTOR_CACHE_DIR"])
            if len(calls) <= fail_times:
                raise OSError(errno.ENOEXEC, "file too short", str(bad / "x.so"))
            return fn(*a, **k)

        return run

    monkeypatch.setattr(C.torch, "compile", fake_compile)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = C.combine_compiled(b, es, [0.3, 0.6])
        again = C.combine_compiled(b, es, [0.3, 0.6])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)
    fresh = Path(C._fresh_cache_dir)
    assert fresh.is_dir() and fresh.name.startswith("blockmerge-inductor-")
    assert calls[0] == (str(bad) if cache == "poisoned" else str(fresh)) and calls[-1] == str(fresh)
    assert len([x for x in w if "torch.compile cannot build" in str(x.message)]) == warned
    assert C.available() == (warned == 0)
    shutil.rmtree(fresh, ignore_errors=True)
