"""LoRA adapters: reading, adapter merges against PEFT's add_weighted_adapter and a direct torch formula,
merge into the base against PEFT's merge_and_unload, bad inputs, and the DivMerge-over-adapters gradient
against autograd through a densely materialised merged model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from blockmerge import lora
from blockmerge.cli import main as cli_main
from blockmerge.synth import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (r, alpha, rslora, seed): the first three share r (linear/ties/dare need equal ranks)
SPECS = [(4, 8, False, 101), (4, 16, False, 102), (4, 4, False, 103)]
ODD = (6, 12, True, 104)  # different rank, rslora: cat/svd against the direct formula
WEIGHTS = [0.5, 1.2, -0.7]


def _save_adapter(path, r, alpha, rslora, seed, targets=TARGETS, **extra):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False, **extra)
    m = get_peft_model(tiny_model("llama", seed=0), cfg)
    with torch.no_grad():  # make B large enough that the adapters change the logits visibly
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_model("llama", seed=0).save_pretrained(root / "base", max_shard_size="40KB")
    ads = [_save_adapter(root / f"ad{i}", *s) for i, s in enumerate(SPECS)]
    odd = _save_adapter(root / "odd", *ODD)
    return root, ads, odd


def _peft(fam, names=("ad0", "ad1", "ad2")):
    root = fam[0]
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), root / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    return pm.eval()


def _factors(pm, name):
    out = {}
    for mod_name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[mod_name] = (mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach())
    return out


def _direct_delta(adapter_dirs, weights, mod):
    """sum_t w_t s_t B_t A_t of one module, straight from the files (independent of blockmerge)."""
    from safetensors.torch import load_file

    total = 0
    for d, w in zip(adapter_dirs, weights, strict=True):
        cfg = json.loads((d / "adapter_config.json").read_text())
        sd = load_file(str(d / "adapter_model.safetensors"))
        A = sd[f"base_model.model.{mod}.lora_A.weight"].double()
        B = sd[f"base_model.model.{mod}.lora_B.weight"].double()
        r = A.shape[0]
        s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        total = total + w * s * (B @ A)
    return total


# ------------------------------------------------------------------------------------------------ reading


def test_read_adapter_scales_and_shapes(fam):
    root, ads, odd = fam
    a = lora.read_adapter(ads[1])
    assert len(a.modules) == 3 * len(TARGETS)
    m = a.modules["model.layers.1.mlp.down_proj"]
    assert m.A.shape == (4, 96) and m.B.shape == (48, 4) and m.scale == 16 / 4
    o = lora.read_adapter(odd)
    assert o.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(12 / math.sqrt(6))
    pm = _peft(fam, ("odd",))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["odd"] == pytest.approx(o.modules["model.layers.0.self_attn.q_proj"].scale)


def test_rank_and_alpha_pattern(tmp_path):
    d = _save_adapter(tmp_path / "pat", 4, 8, False, 7, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    a = lora.read_adapter(d)
    assert a.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == 8 / 2
    assert a.modules["model.layers.0.mlp.down_proj"].scale == 3 / 4
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), d)
    assert pm.base_model.model.model.layers[0].mlp.down_proj.scaling["default"] == 3 / 4


# ----------------------------------------------------------------------------------- merges against PEFT


def _peft_masks(pm, adapters, method, density, seed):
    """The DARE masks blockmerge draws, in the order PEFT's add_weighted_adapter asks for them."""
    queue = []
    for mod_name, mod in pm.base_model.model.named_modules():
        if not (hasattr(mod, "lora_A") and "ad0" in mod.lora_A):
            continue
        present = [t for t, a in enumerate(adapters) if mod_name in a.modules]
        if method.endswith("svd"):
            delta_shape = tuple(mod.weight.shape)
            queue += [lora.dare_mask(delta_shape, density, seed, mod_name, t, "delta") for t in present]
        else:
            for part in ("A", "B"):
                for t in present:
                    f = adapters[t].modules[mod_name]
                    shape = f.A.shape if part == "A" else f.B.shape
                    queue += [lora.dare_mask(shape, density, seed, mod_name, t, part)]
    return queue


METHODS = [
    ("cat", None),
    ("linear", None),
    ("svd", None),
    ("ties", 0.5),
    ("ties_svd", 0.5),
    ("dare_linear", 0.6),
    ("dare_ties", 0.6),
    ("dare_linear_svd", 0.6),
    ("dare_ties_svd", 0.6),
    ("magnitude_prune", 0.5),
    ("magnitude_prune_svd", 0.5),
]


@pytest.mark.parametrize("method,density", METHODS)
def test_merge_equals_peft(fam, monkeypatch, method, density):
    import peft.utils.merge_utils as mu

    root, ads, _ = fam
    adapters = [lora.read_adapter(d) for d in ads]
    pm = _peft(fam)
    if method.startswith("dare"):
        queue = _peft_masks(pm, adapters, method, density, seed=3)

        def fake_random_pruning(tensor, density, rescale):
            mask = queue.pop(0)
            assert mask.shape == tensor.shape
            out = tensor * mask
            return out / density if rescale else out

        monkeypatch.setattr(mu, "random_pruning", fake_random_pruning)
    kw = {} if density is None else {"density": density}
    pm.add_weighted_adapter(["ad0", "ad1", "ad2"], WEIGHTS, "m", combination_type=method, **kw)
    if method.startswith("dare"):
        assert queue == []
    merged = lora.merge_adapters(adapters, WEIGHTS, method, seed=3, **kw)
    theirs = _factors(pm, "m")
    assert merged.config["r"] == pm.peft_config["m"].r
    assert set(theirs) == {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        for k in merged.tensors
        if k.endswith("lora_A.weight")
    }
    for mod, (pa, pb) in theirs.items():
        ma = merged.tensors[f"base_model.model.{mod}.lora_A.weight"]
        mb = merged.tensors[f"base_model.model.{mod}.lora_B.weight"]
        if method.endswith("svd"):  # singular vectors' signs are arbitrary: compare the products
            torch.testing.assert_close(mb @ ma, pb @ pa, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(ma, pa, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(mb, pb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_merged_adapter_loads_with_peft_same_logits(fam, tmp_path, method):
    root, ads, _ = fam
    out = tmp_path / f"m_{method}"
    assert (
        cli_main(
            [
                "lora",
                "merge",
                "--adapters",
                *map(str, ads),
                "--method",
                method,
                "--weights",
                *map(str, WEIGHTS),
                str(out),
            ]
        )
        == 0
    )
    assert (out / "adapter_config.json").exists() and not list(tmp_path.glob(".m_*"))
    pm = _peft(fam)
    pm.add_weighted_adapter(["ad0", "ad1", "ad2"], WEIGHTS, "m", combination_type=method)
    pm.set_adapter("m")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(ids).logits
        mine = PeftModel.from_pretrained(tiny_model("llama", seed=0), out).eval()(ids).logits
        plain = tiny_model("llama", seed=0)(ids).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_cat_and_svd_against_direct_formula(fam):
    """Different ranks and rslora: cat is exact, svd is the best rank-k approximation of the summed delta."""
    root, ads, odd = fam
    dirs = [ads[0], odd]
    w = [0.8, -1.3]
    adapters = [lora.read_adapter(d) for d in dirs]
    cat = lora.merge_adapters(adapters, w, "cat")
    assert cat.config["r"] == 10 and cat.config["lora_alpha"] == 10 and cat.config["use_rslora"] is False
    svd = lora.merge_adapters(adapters, w, "svd", rank=3)
    for mod in adapters[0].modules:
        ref = _direct_delta(dirs, w, mod)
        got = (
            cat.tensors[f"base_model.model.{mod}.lora_B.weight"].double()
            @ cat.tensors[f"base_model.model.{mod}.lora_A.weight"].double()
        )
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        U, S, Vh = torch.linalg.svd(ref)
        ref3 = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        got3 = (
            svd.tensors[f"base_model.model.{mod}.lora_B.weight"].double()
            @ svd.tensors[f"base_model.model.{mod}.lora_A.weight"].double()
        )
        torch.testing.assert_close(got3, ref3, atol=1e-5, rtol=1e-5)


def test_linear_against_direct_formula(fam):
    """linear merges the factors: A = sum sign(ws) sqrt|ws| A_t, B = sum sqrt|ws| B_t (not the deltas)."""
    root, ads, _ = fam
    adapters = [lora.read_adapter(d) for d in ads]
    merged = lora.merge_adapters(adapters, WEIGHTS, "linear")
    mod = "model.layers.2.self_attn.v_proj"
    A = sum(
        math.copysign(math.sqrt(abs(w * a.modules[mod].scale)), w * a.modules[mod].scale) * a.modules[mod].A
        for a, w in zip(adapters, WEIGHTS, strict=True)
    )
    B = sum(math.sqrt(abs(w * a.modules[mod].scale)) * a.modules[mod].B for a, w in zip(adapters, WEIGHTS, strict=True))
    torch.testing.assert_close(merged.tensors[f"base_model.model.{mod}.lora_A.weight"], A, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged.tensors[f"base_model.model.{mod}.lora_B.weight"], B, atol=1e-6, rtol=1e-6)


def test_dare_deterministic_and_seeded(fam):
    root, ads, _ = fam
    adapters = [lora.read_adapter(d) for d in ads]
    a = lora.merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=1)
    b = lora.merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=1)
    c = lora.merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=2)
    k = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    torch.testing.assert_close(a.tensors[k], b.tensors[k], atol=0, rtol=0)
    assert not torch.allclose(a.tensors[k].abs(), c.tensors[k].abs())


def test_union_of_target_modules(fam, tmp_path):
    """Adapters on different module sets: the merge covers the union (PEFT's rule)."""
    root, ads, _ = fam
    only_q = _save_adapter(tmp_path / "q", 4, 8, False, 9, targets=["q_proj"])
    adapters = [lora.read_adapter(ads[0]), lora.read_adapter(only_q)]
    m = lora.merge_adapters(adapters, [1.0, 1.0], "cat")
    assert sorted(m.config["target_modules"]) == sorted(TARGETS)
    mod = "model.layers.0.mlp.up_proj"  # only in the first: second block of the cat factors is zero
    assert torch.count_nonzero(m.tensors[f"base_model.model.{mod}.lora_A.weight"][4:]) == 0


# -------------------------------------------------------------------------------------------- merge into base


def test_merge_into_base_equals_merge_and_unload(fam, tmp_path):
    from transformers import AutoModelForCausalLM

    root, ads, odd = fam
    dirs, w = [ads[0], odd, ads[2]], [0.7, 1.1, -0.4]
    out = tmp_path / "full"
    assert (
        cli_main(
            [
                "lora",
                "merge-into-base",
                "--base",
                str(root / "base"),
                "--adapters",
                *map(str, dirs),
                "--weights",
                *map(str, w),
                "--shard-size",
                "30KB",
                "--no-progress",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "model.safetensors.index.json").exists()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    # PEFT: the cat merge is exact; merge_and_unload folds it into the base
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), dirs[0], adapter_name="a")
    pm.load_adapter(dirs[1], adapter_name="b")
    pm.load_adapter(dirs[2], adapter_name="c")
    pm.add_weighted_adapter(["a", "b", "c"], w, "m", combination_type="cat")
    pm.set_adapter("m")
    ref = pm.merge_and_unload().eval()
    sd_got, sd_ref = got.state_dict(), ref.state_dict()
    assert set(sd_got) == set(sd_ref)
    for k in sd_ref:
        torch.testing.assert_close(sd_got[k], sd_ref[k], atol=1e-6, rtol=1e-5)
    mod = "model.layers.1.mlp.gate_proj"
    base_w = tiny_model("llama", seed=0).state_dict()[f"{mod}.weight"].double()
    torch.testing.assert_close(
        sd_got[f"{mod}.weight"].double(), base_w + _direct_delta(dirs, w, mod), atol=1e-6, rtol=1e-6
    )
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # fp32 rounding of the weights (~1e-6) moves these logits by ~1e-4 (PEFT's own
        # unmerged vs merged forward differ as much), so compare loosely here: the weights above are the test
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, atol=1e-3, rtol=1e-3)
    assert json.loads((out / "blockmerge_lora.json").read_text())["blockmerge_lora"]["weights"] == w


def test_merge_into_base_single_adapter_bf16(fam, tmp_path):
    root, ads, _ = fam
    out = tmp_path / "bf16"
    lora.merge_into_base(root / "base", [ads[1]], None, out, dtype=torch.bfloat16, progress=False)
    from blockmerge.checkpoint import Checkpoint

    ck = Checkpoint(out)
    assert {t.dtype for t in ck.tensors.values()} == {torch.bfloat16}
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), ads[1]).merge_and_unload()
    ref = pm.state_dict()["model.layers.0.self_attn.o_proj.weight"].to(torch.bfloat16)
    torch.testing.assert_close(ck.get("model.layers.0.self_attn.o_proj.weight"), ref)  # bf16: ~1 ulp


# ----------------------------------------------------------------------------------------------- bad inputs


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs(fam, tmp_path, capsys):
    root, ads, _ = fam

    def err(argv):
        assert cli_main(argv) == 2
        return capsys.readouterr().err

    out = str(tmp_path / "o")
    bad = tmp_path / "noconf"
    bad.mkdir()
    assert "no adapter_config.json" in err(["lora", "merge", out, "--adapters", str(bad)])
    j = _copy(ads[0], tmp_path / "badjson")
    (j / "adapter_config.json").write_text("{r: 4")
    assert "adapter_config.json: invalid JSON" in err(["lora", "merge", "--adapters", str(j), "--out", out])
    noweights = _copy(ads[0], tmp_path / "nowt")
    (noweights / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors" in err(["lora", "merge", out, "--adapters", str(noweights)])
    rk = _copy(ads[0], tmp_path / "rank")
    cfg = json.loads((rk / "adapter_config.json").read_text())
    (rk / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    e = err(["lora", "merge", out, "--adapters", str(rk)])
    assert "has rank 4 but adapter_config.json says r=8" in e
    other = _copy(ads[1], tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/other")))
    first = _copy(ads[0], tmp_path / "first")
    cfg = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/base")))
    assert "base_model_name_or_path 'org/other' differs" in err(
        ["lora", "merge", "--adapters", str(first), str(other), out]
    )
    wide = tmp_path / "wide"  # adapter for a model with another hidden size
    torch.manual_seed(0)
    m = get_peft_model(
        tiny_model("llama", seed=0, hidden_size=64, intermediate_size=96),
        LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
    )
    m.save_pretrained(wide)
    assert "not the same base" in err(["lora", "merge", "--adapters", str(ads[0]), str(wide), out])
    e = err(["lora", "merge-into-base", "--base", str(root / "base"), "--adapters", str(wide), "--no-progress", out])
    assert "model.safetensors" in e or "has shape" in e
    assert "needs --density" in err(["lora", "merge", "--adapters", *map(str, ads), "--method", "ties", out])
    assert "same rank" in err(["lora", "merge", "--adapters", str(ads[0]), str(fam[2]), "--method", "linear", out])
    assert "expected 3 values" in err(["lora", "merge", "--adapters", *map(str, ads), "--weights", "1", out])
    with pytest.raises(SystemExit):
        cli_main(["lora", "merge", "--adapters", str(ads[0]), "--method", "nope", out])
    capsys.readouterr()
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    # existing output: refused, then --force replaces it
    (tmp_path / "o").mkdir()
    assert "already exists" in err(["lora", "merge", "--adapters", *map(str, ads), out])
    assert cli_main(["lora", "merge", "--adapters", *map(str, ads), out, "--force"]) == 0
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
