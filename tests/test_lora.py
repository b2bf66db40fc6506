"""LoRA adapters: reading, adapter merges against PEFT's add_weighted_adapter and a direct torch formula,
merge into the base against PEFT's merge_and_unload, bad inputs, and the DivMerge-over-adapters gradient
against autograd through a densely materialised merged model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from blockmerge.cli import main as cli_main
from blockmerge.lora.adapter import read_adapter
from blockmerge.lora.into_base import merge_into_base
from blockmerge.lora.merge import dare_mask, merge_adapters
from blockmerge.suite.synth import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (r, alpha, rslora, seed): the first three share r (linear/ties/dare need equal ranks)
SPECS = [(4, 8, False, 101), (4, 16, False, 102), (4, 4, False, 103)]
ODD = (6, 12, True, 104)  # different rank, rslora: cat/svd against the direct formula
WEIGHTS = [0.5, 1.2, -0.7]


def save_adapter(path, r, alpha, rslora, seed, targets=TARGETS, **extra):
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False, **extra)
    base = tiny_model("llama", seed=0)  # (re-seeds torch: seed the adapter's init after it)
    torch.manual_seed(seed)
    m = get_peft_model(base, cfg)
    with torch.no_grad():  # make B large enough that the adapters change the logits visibly
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
    m.save_pretrained(path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_model("llama", seed=0).save_pretrained(root / "base", max_shard_size="40KB")
    ads = [save_adapter(root / f"ad{i}", *s) for i, s in enumerate(SPECS)]
    odd = save_adapter(root / "odd", *ODD)
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
    a = read_adapter(ads[1])
    assert len(a.modules) == 3 * len(TARGETS)
    m = a.modules["model.layers.1.mlp.down_proj"]
    assert m.A.shape == (4, 96) and m.B.shape == (48, 4) and m.scale == 16 / 4
    o = read_adapter(odd)
    assert o.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(12 / math.sqrt(6))
    pm = _peft(fam, ("odd",))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["odd"] == pytest.approx(o.modules["model.layers.0.self_attn.q_proj"].scale)


def test_rank_and_alpha_pattern(tmp_path):
    d = save_adapter(tmp_path / "pat", 4, 8, False, 7, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    a = read_adapter(d)
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
            queue += [dare_mask(delta_shape, density, seed, mod_name, t, "delta") for t in present]
        else:
            for part in ("A", "B"):
                for t in present:
                    f = adapters[t].modules[mod_name]
                    shape = f.A.shape if part == "A" else f.B.shape
                    queue += [dare_mask(shape, density, seed, mod_name, t, part)]
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
    adapters = [read_adapter(d) for d in ads]
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
    merged = merge_adapters(adapters, WEIGHTS, method, seed=3, **kw)
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
                "--out",
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
    adapters = [read_adapter(d) for d in dirs]
    cat = merge_adapters(adapters, w, "cat")
    assert cat.config["r"] == 10 and cat.config["lora_alpha"] == 10 and cat.config["use_rslora"] is False
    svd = merge_adapters(adapters, w, "svd", rank=3)
    svd10 = merge_adapters(adapters, w, "svd", rank=10)
    for mod in adapters[0].modules:
        ref = _direct_delta(dirs, w, mod)
        got = (
            cat.tensors[f"base_model.model.{mod}.lora_B.weight"].double()
            @ cat.tensors[f"base_model.model.{mod}.lora_A.weight"].double()
        )
        torch.testing.assert_close(got, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-5)
        S = torch.linalg.svdvals(ref)
        got3 = (
            svd.tensors[f"base_model.model.{mod}.lora_B.weight"].double()
            @ svd.tensors[f"base_model.model.{mod}.lora_A.weight"].double()
        )
        # Eckart-Young: the best rank-3 approximation leaves exactly the tail singular values as residual
        assert torch.linalg.matrix_rank(got3, rtol=1e-6) <= 3
        assert float((ref - got3).norm()) == pytest.approx(float(S[3:].norm()), rel=1e-4)
        full = (
            svd10.tensors[f"base_model.model.{mod}.lora_B.weight"].double()
            @ svd10.tensors[f"base_model.model.{mod}.lora_A.weight"].double()
        )
        torch.testing.assert_close(full, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)  # rank 10: exact


def test_linear_against_direct_formula(fam):
    """linear merges the factors: A = sum sign(ws) sqrt|ws| A_t, B = sum sqrt|ws| B_t (not the deltas)."""
    root, ads, _ = fam
    adapters = [read_adapter(d) for d in ads]
    merged = merge_adapters(adapters, WEIGHTS, "linear")
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
    adapters = [read_adapter(d) for d in ads]
    a = merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=1)
    b = merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=1)
    c = merge_adapters(adapters, WEIGHTS, "dare_ties_svd", density=0.5, seed=2)
    k = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    torch.testing.assert_close(a.tensors[k], b.tensors[k], atol=0, rtol=0)
    assert not torch.allclose(a.tensors[k].abs(), c.tensors[k].abs())


def test_union_of_target_modules(fam, tmp_path):
    """Adapters on different module sets: the merge covers the union (PEFT's rule)."""
    root, ads, _ = fam
    only_q = save_adapter(tmp_path / "q", 4, 8, False, 9, targets=["q_proj"])
    adapters = [read_adapter(ads[0]), read_adapter(only_q)]
    m = merge_adapters(adapters, [1.0, 1.0], "cat")
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
    merge_into_base(root / "base", [ads[1]], None, out, dtype=torch.bfloat16, progress=False)
    from blockmerge.io.checkpoint import Checkpoint

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
        ["lora", "merge", out, "--adapters", str(first), str(other)]
    )
    wide = tmp_path / "wide"  # adapter for a model with another hidden size
    torch.manual_seed(0)
    m = get_peft_model(
        tiny_model("llama", seed=0, hidden_size=64, intermediate_size=96),
        LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
    )
    m.save_pretrained(wide)
    assert "not the same base" in err(["lora", "merge", out, "--adapters", str(ads[0]), str(wide)])
    e = err(["lora", "merge-into-base", "--base", str(root / "base"), "--adapters", str(wide), "--no-progress", out])
    assert "model.safetensors" in e or "has shape" in e
    assert "needs --density" in err(["lora", "merge", "--adapters", *map(str, ads), "--method", "ties", out])
    assert "same rank" in err(["lora", "merge", "--adapters", str(ads[0]), str(fam[2]), "--method", "linear", out])
    assert "expected 3 values" in err(["lora", "merge", "--adapters", *map(str, ads), "--weights", "1", "--out", out])
    # OUT is never guessed from the end of a list option: an adapter can never become the output
    assert "OUT is missing" in err(["lora", "merge", "--adapters", *map(str, ads), out])
    with pytest.raises(SystemExit):
        cli_main(["lora", "merge", "--adapters", str(ads[0]), "--method", "nope", out])
    capsys.readouterr()
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    # existing output: refused, then --force replaces it
    (tmp_path / "o").mkdir()
    assert "already exists" in err(["lora", "merge", out, "--adapters", *map(str, ads)])
    assert cli_main(["lora", "merge", out, "--adapters", *map(str, ads), "--force"]) == 0
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------- DivMerge over adapters


def _prompts(n_tasks=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, 97, (int(L),), generator=g).tolist() for L in (3, 5, 5, 4)[:n]] for _ in range(n_tasks)]


def _dense_loss_and_grad(base_dir, adapter_dirs, gamma, batch, objective, level):
    """Autograd through the fully materialised merged model W0 + sum_t Gamma[t, b] s_t B_t A_t (float64)."""
    from blockmerge.io.checkpoint import Checkpoint, block_name
    from blockmerge.learn.losses import divergence
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").double().eval()
    blocks = [b.name for b in Checkpoint(base_dir).blocks()]
    G = gamma.clone().double().requires_grad_(True)
    Gf = G if level == "layer" else G[:, None].expand(G.shape[0], len(blocks))
    params = dict(model.named_parameters())
    params = {k: v.detach() for k, v in params.items()}
    for t, d in enumerate(adapter_dirs):
        for mod, m in read_adapter(d).modules.items():
            k = f"{mod}.weight"
            b = blocks.index(block_name(k))
            params[k] = params[k] + Gf[t, b] * m.scale * (m.B.double() @ m.A.double())
    logits = functional_call(model, params, (batch.input_ids,)).logits
    logq = torch.log_softmax(logits[batch.rows, batch.cols], -1)
    targets = None if batch.targets is None else batch.targets
    loss = (divergence(logq, targets, objective) * batch.weights.double()).sum()
    loss.backward()
    return loss.item(), G.grad


@pytest.mark.parametrize(
    "objective,level,full_vocab_max",
    [("js", "layer", 4096), ("js", "task", 4096), ("kl", "layer", 16), ("entropy", "layer", 4096)],
)
def test_lora_divmerge_gradient_equals_autograd(fam, tmp_path, objective, level, full_vocab_max):
    from blockmerge.learn.learner import make_batch
    from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_folders
    from blockmerge.lora.learn import StreamedLoraMerge

    root, ads, _ = fam
    base = root / "base"
    sm = StreamedLoraMerge(base, ads, dtype=torch.float64, token_chunk=7, attn_implementation="eager")
    spec = TeacherSpec(max_new_tokens=4, eos_token_id=1, full_vocab_max=full_vocab_max, topk=8,
                       store_dists=objective != "entropy")  # fmt: skip
    data = TeacherData(teacher_folders(sm, _prompts(), tmp_path, spec, progress=False))
    batch = make_batch([(0, 0), (1, 2), (2, 1), (0, 3), (1, 1)], data)
    nb = len(sm.blocks)
    gamma = torch.rand((3, nb) if level == "layer" else (3,), generator=torch.Generator().manual_seed(5)) * 0.8
    full = gamma if level == "layer" else gamma[:, None].expand(3, nb)
    loss, grad = sm.loss_and_grad(full, batch, objective)
    if level == "task":
        grad = grad.sum(1)
    ref_loss, ref_grad = _dense_loss_and_grad(base, ads, gamma, batch, objective, level)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * float(ref_grad.abs().max()))
    assert float(ref_grad.abs().max()) > 0
    if level == "layer":  # embed and head blocks hold no adapted module: zero gradient
        assert float(grad[:, 0].abs().max()) == 0 and float(grad[:, -1].abs().max()) == 0


def test_lora_teacher_is_base_plus_adapter(fam, tmp_path):
    """The teacher of task t (Gamma = e_t on the low-rank modules) = PEFT's model with adapter t."""
    from blockmerge.lora.learn import StreamedLoraMerge

    root, ads, _ = fam
    sm = StreamedLoraMerge(root / "base", ads, attn_implementation="eager")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    onehot = torch.zeros(3, len(sm.blocks))
    onehot[1] = 1
    sm.set_coefficients(onehot)
    got = sm.model.forward(ids, source=sm.source)
    sm.set_coefficients(None)
    pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), ads[1]).eval()
    with torch.no_grad():
        ref = pm(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the cached teacher data (all tasks generated in shared batches, one-hot coefficients per row) holds
    # each adapter's own greedy continuation and distributions
    from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_folders

    spec = TeacherSpec(max_new_tokens=4, eos_token_id=1)
    data = TeacherData(teacher_folders(sm, _prompts(), tmp_path, spec, progress=False))
    for t in range(3):
        pm = PeftModel.from_pretrained(tiny_model("llama", seed=0), ads[t]).eval()
        for j in range(data.n_seqs(t)):
            tokens, plen, targets = data.get(t, j)
            with torch.no_grad():
                p = torch.softmax(pm(tokens[None, :-1]).logits[0, plen - 1 :], -1)
            assert tokens[plen:].tolist() == p.argmax(-1).tolist()
            torch.testing.assert_close(targets.probs, p, atol=1e-5, rtol=1e-4)


def test_lora_divmerge_cli_end_to_end(fam, tmp_path):
    from blockmerge.io.checkpoint import Checkpoint

    root, ads, _ = fam
    files = []
    for t, prompts in enumerate(_prompts()):
        f = tmp_path / f"task{t}.jsonl"
        f.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
        files.append(f)
    cfg = {
        "base_model": str(root / "base"),
        "adapters": [{"adapter": str(a), "data": str(f)} for a, f in zip(ads, files, strict=True)],
        "level": "task",
        "steps": 4,
        "batch_size": 4,
        "max_new_tokens": 3,
        "lr": 0.05,
        "attn_implementation": "eager",
    }
    import yaml

    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert cli_main(["lora", "divmerge", str(tmp_path / "c.yml"), str(out), "--no-progress"]) == 0
    info = json.loads((out / "divmerge.json").read_text())
    assert len(info["losses"]) == 4 and len(info["coefficients"]) == 3
    gam = [info["coefficients"][t]["layers.0"] for t in range(3)]
    assert all(abs(g - 1 / 3) > 1e-4 for g in gam)  # learned: moved from the init
    # the merged checkpoint equals merge-into-base with the learned weights
    ref = tmp_path / "ref"
    merge_into_base(root / "base", ads, gam, ref, progress=False)
    a, b = Checkpoint(out), Checkpoint(ref)
    for n in a.tensors:
        torch.testing.assert_close(a.get(n), b.get(n), atol=1e-6, rtol=1e-6)
    # adapter output: an exact cat adapter of the learned merge
    ad_out = tmp_path / "ad_out"
    assert cli_main(["lora", "divmerge", str(tmp_path / "c.yml"), str(ad_out), "--output", "adapter",
                     "--no-progress"]) == 0  # fmt: skip
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        x = PeftModel.from_pretrained(tiny_model("llama", seed=0), ad_out).eval()(ids).logits
        y = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()(ids).logits
    torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    # bad config: names the field
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(dict(cfg, level="block")))
    with pytest.raises(ValueError, match="field level"):
        from blockmerge.lora.learn import run_divmerge

        run_divmerge(tmp_path / "bad.yml", tmp_path / "x", progress=False)


def test_lora_learning_reduces_loss(fam, tmp_path):
    from blockmerge.lora.learn import learn

    root, ads, _ = fam
    res = learn(root / "base", ads, _prompts(), level="layer", steps=12, batch_size=12, lr=0.05,
                max_new_tokens=4, eos_token_id=1, progress=False, cache_dir=tmp_path)  # fmt: skip
    assert res.coefficients.shape == (3, 5)
    assert sum(res.losses[-3:]) / 3 < res.losses[0]


def test_lora_teacher_cache_is_reused_by_default(fam, tmp_path, monkeypatch):
    import blockmerge.learn.teacher as teacher
    import blockmerge.lora.learn as lora_learn

    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path))
    calls = []
    real = teacher.continuations
    monkeypatch.setattr(teacher, "continuations", lambda *a, **k: calls.append(1) or real(*a, **k))
    root, ads, _ = fam
    kw = dict(level="layer", steps=3, batch_size=6, max_new_tokens=3, eos_token_id=1, progress=False)
    first = lora_learn.learn(root / "base", ads, _prompts(), **kw)
    assert len(calls) == 1 and len(list((tmp_path / "teacher").glob("*/manifest.json"))) == 3
    second = lora_learn.learn(root / "base", ads, _prompts(), **kw)
    assert len(calls) == 1  # nothing regenerated
    assert torch.equal(first.coefficients, second.coefficients) and first.losses == second.losses


def test_bitsandbytes_base_on_cpu(fam, tmp_path):
    """Optional quantized base (bitsandbytes nf4 / int8) for the student's forward passes: runs on CPU with
    bitsandbytes >= 0.49 and gives a loss and coefficient gradient close to the full-precision ones."""
    pytest.importorskip("bitsandbytes")
    from blockmerge.learn.learner import make_batch
    from blockmerge.learn.teacher import TeacherData, TeacherSpec, teacher_folders
    from blockmerge.lora.learn import StreamedLoraMerge

    root, ads, _ = fam
    ref = StreamedLoraMerge(root / "base", ads, attn_implementation="eager")
    spec = TeacherSpec(max_new_tokens=3, eos_token_id=1)
    data = TeacherData(teacher_folders(ref, _prompts(), tmp_path, spec, progress=False))
    batch = make_batch([(0, 0), (1, 1), (2, 2)], data)
    gamma = torch.full((3, len(ref.blocks)), 0.3)
    loss, grad = ref.loss_and_grad(gamma, batch, "js")
    for kind in ("nf4", "int8"):
        sm = StreamedLoraMerge(root / "base", ads, attn_implementation="eager", quantize=kind)
        qloss, qgrad = sm.loss_and_grad(gamma, batch, "js")
        assert math.isfinite(qloss) and torch.isfinite(qgrad).all()
        assert qloss == pytest.approx(loss, rel=0.3)  # quantization noise: loose on a 48-wide random model
        assert float(qgrad.abs().max()) > 0
        assert float((qgrad - grad).norm() / grad.norm()) < 1.0


# ---------------------------------------------------------------------------------------------- lora extract


@pytest.fixture(scope="module")
def extract_fam(tmp_path_factory):
    """{arch: (base, expert)}: expert = base + a random task vector on every tensor (norms and embeddings too)."""
    from blockmerge.suite.synth import make_family

    root = tmp_path_factory.mktemp("extract")
    return {arch: (b, e[0]) for arch in ("llama", "gpt2") for b, e in [make_family(root / arch, arch, n_experts=1)]}


def _extract(base, expert, out, rank, *extra):
    argv = ["lora", "extract", str(out), "--base", str(base), "--model", str(expert), "--rank", str(rank)]
    assert cli_main([*argv, "--no-progress", *map(str, extra)]) == 0
    return json.loads((out / "blockmerge_lora.json").read_text())["extract"]


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_extract_full_rank_reproduces_the_model(extract_fam, tmp_path, capsys):
    base, expert = extract_fam["llama"]
    report = _extract(base, expert, tmp_path / "ad", 48)  # 48 = the smallest side of every weight: exact
    table = capsys.readouterr().out
    assert "model.layers.2.mlp.down_proj" in table and "largest relative error" in table
    assert len(report["modules"]) == 3 * 7 and max(m["relative_error"] for m in report["modules"]) < 1e-5
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(report["not_in_adapter"])
    merge_into_base(base, [tmp_path / "ad"], None, tmp_path / "merged", progress=False)
    got, want, base_sd = _state(tmp_path / "merged"), _state(expert), _state(base)
    adapted = {m["module"] + ".weight" for m in report["modules"]}
    for k, w in want.items():
        if k in adapted:
            torch.testing.assert_close(got[k], w, atol=2e-6, rtol=1e-5)
        else:  # embeddings, norms, head: not in the adapter, so the base's
            torch.testing.assert_close(got[k], base_sd[k], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, stored transposed (fan_in_fan_out)
def test_extract_low_rank_error_and_peft_logits(extract_fam, tmp_path, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, expert = extract_fam[arch]
    out, rank = tmp_path / "ad", 3
    report = _extract(base, expert, out, rank)
    b_sd, e_sd = _state(base), _state(expert)
    for m in report["modules"]:  # the Eckart-Young tail of the delta's singular values, in float64
        S = torch.linalg.svdvals(e_sd[m["module"] + ".weight"].double() - b_sd[m["module"] + ".weight"].double())
        expected = float((S[rank:].square().sum() / S.square().sum()).sqrt())
        assert m["relative_error"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert 0.1 < expected < 1  # random task vectors: rank 3 leaves a visible error
    cfg = json.loads((out / "adapter_config.json").read_text())
    factors, scale = load_file(str(out / "adapter_model.safetensors")), cfg["lora_alpha"] / cfg["r"]
    ref = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():  # transformers' model with W0 + scale B A written into its weights
        for name, mod in ref.named_modules():
            if f"base_model.model.{name}.lora_A.weight" in factors:
                delta = (
                    scale
                    * factors[f"base_model.model.{name}.lora_B.weight"]
                    @ factors[f"base_model.model.{name}.lora_A.weight"]
                )
                mod.weight += delta.T if arch == "gpt2" else delta
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want, before = pm(ids).logits, ref(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the adapter was loaded and changes the model


def test_extract_bad_inputs(extract_fam, tmp_path, capsys):
    from safetensors.torch import save_file

    base, expert = extract_fam["llama"]

    def err(*extra, model=expert, out=tmp_path / "o"):
        argv = ["lora", "extract", str(out), "--base", str(base), "--model", str(model), *map(str, extra)]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ": error: " in ln]
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("blockmerge lora: error: "), err
        return lines[0]

    assert "--rank must be an integer >= 1, got 0" in err("--rank", "0")
    assert "--target-modules nope: no linear module" in err("--rank", "2", "--target-modules", "q_proj", "nope")
    assert "applies to CUDA only" in err("--rank", "2", "--svd-driver", "gesvd")
    assert "OUT is the input" in err("--rank", "2", out=expert)
    sd = _state(expert)
    for name, change in {
        "missing": lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
        "shape": lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 48)}),
    }.items():
        bad = tmp_path / name
        bad.mkdir()
        shutil.copy(expert / "config.json", bad / "config.json")
        broken = dict(sd)
        change(broken)
        save_file(broken, str(bad / "model.safetensors"))
        line = err("--rank", "2", model=bad)
        assert "tensor model.layers.1.mlp.up_proj.weight" in line and str(bad) in line
        assert ("is missing" if name == "missing" else "has shape [95, 48], base has [96, 48]") in line
    (tmp_path / "o").mkdir()
    assert "already exists (use --force" in err("--rank", "2")
    assert not (tmp_path / "o" / "adapter_config.json").exists()
