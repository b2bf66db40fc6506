"""Checkpoint reader, block streamer, sharded writer, and bad inputs through the CLI: every bad input gives
one clear error naming the file / tensor / field, and leaves nothing in the output's parent folder."""

from __future__ import annotations

import json
import shutil
import threading
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from blockmerge.cli import main
from blockmerge.io.checkpoint import Checkpoint, CheckpointError, check_compatible
from blockmerge.io.commit import OutputExistsError
from blockmerge.io.stream import stream_blocks
from blockmerge.io.writer import CheckpointWriter
from blockmerge.merge.run import stream_merge
from blockmerge.suite.synth import make_family, write_synthetic_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base, experts = make_family(root, "llama", n_experts=2, seed=4, num_hidden_layers=6)
    return root, base, experts


def load_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ties_yaml(path: Path, base: Path, experts: list[Path], method: str = "ties") -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def left_in(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# -------------------------------------------------------------------------------------------------- reader


def test_reader_sharded_matches_transformers(fam):
    _, base, _ = fam
    assert (base / "model.safetensors.index.json").exists()
    ck = Checkpoint(base)
    sd = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert set(ck.tensors) == set(sd)
    for name in ck.tensors:
        assert torch.equal(ck.get(name), sd[name]), name
    names = [b.name for b in ck.blocks()]
    assert names == ["embed"] + [f"layers.{i}" for i in range(6)] + ["head"]
    assert ck.num_layers == 6
    assert ck.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    ck.release()


def test_check_compatible_names_first_mismatch(fam, tmp_path):
    _, base, experts = fam
    b = Checkpoint(base)
    sd = load_all(experts[0])
    name = "model.layers.2.mlp.up_proj.weight"

    def variant(tag, change):
        d = tmp_path / tag
        d.mkdir()
        s = dict(sd)
        change(s)
        save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})
        return Checkpoint(d)

    with pytest.raises(CheckpointError, match=rf"/missing: tensor {name} of base"):
        check_compatible(b, [variant("missing", lambda s: s.pop(name))])
    with pytest.raises(CheckpointError, match=rf"/shape: tensor {name} has shape \[95, 48\], base has \[96, 48\]"):
        check_compatible(b, [variant("shape", lambda s: s.__setitem__(name, s[name][:95].clone()))])
    with pytest.raises(CheckpointError, match=rf"/dtype: tensor {name} has dtype torch.float16"):
        check_compatible(b, [variant("dtype", lambda s: s.__setitem__(name, s[name].half()))])
    with pytest.raises(CheckpointError, match=r"/extra: tensor extra.weight is not in base"):
        check_compatible(b, [variant("extra", lambda s: s.__setitem__("extra.weight", torch.zeros(2)))])


# ------------------------------------------------------------------------------------------------ streamer


def test_stream_blocks_prefetch_equals_sequential(fam):
    _, base, experts = fam
    models = [Checkpoint(base), *[Checkpoint(e) for e in experts]]
    a = [(b.name, t) for b, t in stream_blocks(models, prefetch=True)]
    s = [(b.name, t) for b, t in stream_blocks(models, prefetch=False)]
    assert [n for n, _ in a] == [n for n, _ in s]
    for (_, ta), (_, ts) in zip(a, s, strict=True):
        for da, ds in zip(ta, ts, strict=True):
            assert da.keys() == ds.keys() and all(torch.equal(da[k], ds[k]) for k in da)


def test_stream_merge_holds_one_block_at_a_time(fam, tmp_path):
    """Memory does not grow with the number of layers: when a tensor is merged, no tensor of an earlier
    block is still alive (only the current block, plus the one being prefetched, exist)."""
    _, base, experts = fam
    seen: list[tuple[str, weakref.ref]] = []
    worst = 0

    def fn(name, b, ex):
        nonlocal worst
        from blockmerge.io.checkpoint import block_name

        for t in (b, *ex):
            seen.append((block_name(name), weakref.ref(t)))
        alive = {blk for blk, r in seen if r() is not None}
        worst = max(worst, len(alive))
        return b + sum(e - b for e in ex) / len(ex)

    stream_merge(Checkpoint(base), [Checkpoint(e) for e in experts], tmp_path / "o", fn, progress=False)
    assert len({blk for blk, _ in seen}) == 8
    assert worst == 1


# -------------------------------------------------------------------------------------------------- writer


def test_writer_shards_index_and_load(fam, tmp_path):
    _, base, _ = fam
    ck = Checkpoint(base)
    plan = [(n, ck.tensors[n].shape, ck.tensors[n].dtype) for b in ck.blocks() for n in b.tensors]
    out = tmp_path / "w"
    with CheckpointWriter(out, plan, shard_size="20KB") as w:
        for n, _, _ in reversed(plan):  # any write order
            w.write(n, ck.get(n))
        w.finish(copy_from=base)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == ck.nbytes
    for f in files:  # every shard but one-tensor shards stays within the limit
        sizes = [ck.tensors[n].nbytes for n, ff in index["weight_map"].items() if ff == f]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    got = load_all(out)
    assert all(torch.equal(got[n], ck.get(n)) for n in ck.tensors)
    AutoModelForCausalLM.from_pretrained(out)
    assert left_in(tmp_path) == ["w"]
    with pytest.raises(OutputExistsError, match="already exists"):
        CheckpointWriter(out, plan)


def test_failure_mid_merge_leaves_nothing(fam, tmp_path):
    _, base, experts = fam
    calls = 0

    def fn(name, b, ex):
        nonlocal calls
        calls += 1
        if "layers.3" in name:
            raise RuntimeError("boom")
        return b

    with pytest.raises(RuntimeError, match="boom"):
        stream_merge(Checkpoint(base), [Checkpoint(e) for e in experts], tmp_path / "o", fn, progress=False)
    assert calls > 5
    assert left_in(tmp_path) == []


def _write_all(out: Path, ck: Checkpoint, behind: int) -> dict[str, bytes]:
    plan = [(n, ck.tensors[n].shape, ck.tensors[n].dtype) for b in ck.blocks() for n in b.tensors]
    with CheckpointWriter(out, plan, shard_size="20KB", write_behind=behind) as w:
        for n, _, _ in plan:
            w.write(n, ck.get(n).clone())
        w.finish()
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_write_behind_gives_the_same_files(fam, tmp_path):
    """Tensors queued for the writer thread (one at a time, or many) land in the same bytes as direct writes."""
    ck = Checkpoint(fam[1])
    direct = _write_all(tmp_path / "direct", ck, 0)
    assert len(direct) > 3
    assert _write_all(tmp_path / "one", ck, 1) == direct  # the queue holds one tensor: put waits for each
    assert _write_all(tmp_path / "all", ck, ck.nbytes) == direct
    merged = stream_merge(ck, [Checkpoint(e) for e in fam[2]], tmp_path / "m", lambda n, b, ex: b, progress=False)
    assert load_all(merged).keys() == ck.tensors.keys()
    assert all(torch.equal(t, ck.get(n)) for n, t in load_all(merged).items())


def test_writer_thread_error_surfaces_and_nothing_is_committed(fam, tmp_path, monkeypatch):
    import errno

    import blockmerge.io.writer as W

    _, base, experts = fam
    pwrite, calls = W.os.pwrite, []

    def full(fd, data, offset):
        calls.append(threading.current_thread().name)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(W.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left on device") as err:
        stream_merge(
            Checkpoint(base), [Checkpoint(e) for e in experts], tmp_path / "o", lambda n, b, ex: b, progress=False
        )
    assert len(calls) == 7 and calls[-1] == "blockmerge-writer"  # written behind, stopped at the error
    line = str(err.value)
    assert "\n" not in line and ".tmp" in line and "(tensor model." in line  # the shard file and the tensor
    assert left_in(tmp_path) == []


def test_synthetic_llama_writer_small(tmp_path):
    base, experts = write_synthetic_llama(
        tmp_path / "s", n_experts=2, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=50
    )
    m = AutoModelForCausalLM.from_pretrained(base)
    assert next(m.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in m.parameters()) == Checkpoint(base).nbytes // 2
    check_compatible(Checkpoint(base), [Checkpoint(e) for e in experts])
    a, b = load_all(base), load_all(experts[0])
    name = "model.layers.1.mlp.up_proj.weight"
    tau = b[name].float() - a[name].float()
    assert 0.001 < tau.std() < 0.004


# ------------------------------------------------------------------------------------ bad inputs via the CLI


@pytest.fixture
def cli_setup(fam, tmp_path):
    root, base, experts = fam
    work = tmp_path / "inputs"
    shutil.copytree(root, work)
    outs = tmp_path / "outs"
    return work / "base", [work / e.name for e in experts], outs


def run_cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_missing_shard(cli_setup, capsys, tmp_path):
    base, experts, outs = cli_setup
    victim = sorted(experts[1].glob("model-*.safetensors"))[2]
    victim.unlink()
    rc, err = run_cli(["merge", str(ties_yaml(tmp_path / "c.yml", base, experts)), str(outs / "m")], capsys)
    assert rc == 2 and f"{victim}: shard listed in model.safetensors.index.json is missing" in err
    assert left_in(outs) == []


def test_truncated_shard(cli_setup, capsys, tmp_path):
    base, experts, outs = cli_setup
    victim = sorted(experts[0].glob("model-*.safetensors"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 64)
    rc, err = run_cli(["merge", str(ties_yaml(tmp_path / "c.yml", base, experts)), str(outs / "m")], capsys)
    assert rc == 2 and f"{victim}: cannot read safetensors file" in err
    assert left_in(outs) == []


def test_mismatched_shape(cli_setup, capsys, tmp_path):
    base, experts, outs = cli_setup
    name = "model.layers.4.self_attn.o_proj.weight"
    sd = load_all(experts[1])
    sd[name] = sd[name][:, :40].clone()
    for f in experts[1].glob("model*"):
        f.unlink()
    save_file(sd, str(experts[1] / "model.safetensors"), metadata={"format": "pt"})
    rc, err = run_cli(["merge", str(ties_yaml(tmp_path / "c.yml", base, experts)), str(outs / "m")], capsys)
    assert rc == 2 and f"{experts[1]}: tensor {name} has shape [48, 40], base has [48, 48]" in err
    assert left_in(outs) == []


def test_unknown_method(cli_setup, capsys, tmp_path):
    base, experts, outs = cli_setup
    rc, err = run_cli(
        ["merge", str(ties_yaml(tmp_path / "c.yml", base, experts, method="model_soup")), str(outs / "m")], capsys
    )
    assert rc == 2 and "c.yml: invalid merge config: merge_method: Input should be 'linear'" in err
    assert left_in(outs) == []


def test_bad_yaml(cli_setup, capsys, tmp_path):
    _, _, outs = cli_setup
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    rc, err = run_cli(["merge", str(p), str(outs / "m")], capsys)
    assert rc == 2 and "bad.yml: not valid YAML" in err and "line 4" in err
    assert left_in(outs) == []


def test_existing_output_and_force(cli_setup, capsys, tmp_path):
    base, experts, outs = cli_setup
    out = outs / "m"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("keep me")
    cfg = str(ties_yaml(tmp_path / "c.yml", base, experts))
    rc, err = run_cli(["merge", cfg, str(out), "--no-progress"], capsys)
    assert rc == 2 and f"{out}: output already exists (use --force to overwrite)" in err
    assert left_in(outs) == ["m"] and (out / "old.txt").read_text() == "keep me"
    rc, _ = run_cli(["merge", cfg, str(out), "--force", "--no-progress"], capsys)
    assert rc == 0
    assert left_in(outs) == ["m"] and not (out / "old.txt").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_kernels_option_picks_the_path(cli_setup, capsys, tmp_path, monkeypatch):
    """`blockmerge --kernels X merge ...` sends every combine through path X (the same result either way)."""
    import blockmerge.kernels as K
    from blockmerge.cli import KERNELS

    assert set(KERNELS) == {"auto", *K.BACKENDS, *K.ALIASES}
    monkeypatch.setenv("BLOCKMERGE_KERNELS", "auto")  # restored after the test: main() sets it
    used = []
    for name, fn in (("compiled", K.compiled.combine_fused), ("torch", K.combine_torch)):
        wrapped = lambda *a, _fn=fn, _name=name, **kw: (used.append(_name), _fn(*a, **kw))[1]
        monkeypatch.setattr(K.compiled if name == "compiled" else K, fn.__name__, wrapped)
    base, experts, outs = cli_setup
    cfg = str(ties_yaml(tmp_path / "c.yml", base, experts))
    merged = {}
    for kernels in ("compiled", "torch"):
        used.clear()
        rc, err = run_cli(["--kernels", kernels, "merge", cfg, str(outs / kernels), "--no-progress"], capsys)
        assert rc == 0, err
        assert used and set(used) == {kernels} and K.compiled.available()
        merged[kernels] = load_all(outs / kernels)
    for name, t in merged["torch"].items():
        torch.testing.assert_close(merged["compiled"][name].float(), t.float(), rtol=1e-2, atol=1e-2, msg=name)
