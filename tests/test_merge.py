"""Static merges against plain in-memory torch formulas written here independently (stacked task vectors,
top-k, explicit sign election), and end-to-end CLI merges loaded back with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from blockmerge.cli import main
from blockmerge.io.checkpoint import block_name
from blockmerge.kernels import dare_keep
from blockmerge.merge.config import ConfigError, evaluate_setting, layer_t, load_config
from blockmerge.merge.methods import dare_seed
from blockmerge.merge.run import run_merge
from blockmerge.suite.synth import make_family
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

NUM_LAYERS = 3  # synth.TINY families


# ----------------------------------------------------------------------------------------------- helpers


def load_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def fam32(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam32")
    base, experts = make_family(root, "llama", n_experts=3, seed=1, dtype=torch.float32)
    return base, experts


@pytest.fixture(scope="module")
def fam16(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam16")
    base, experts = make_family(root, "llama", n_experts=3, seed=2, dtype=torch.bfloat16)
    return base, experts


def cfg_dict(method, base, experts, weights=None, densities=None, **params):
    models = []
    for i, e in enumerate(experts):
        p = {}
        if weights is not None:
            p["weight"] = weights[i]
        if densities is not None:
            p["density"] = densities[i]
        models.append({"model": str(e), "parameters": p})
    d = {"merge_method": method, "models": models, "parameters": params}
    if base is not None:
        d["base_model"] = str(base)
    return d


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification: keep exactly the k = int(density * numel) largest |tau|."""
    k = int(density * tau.numel())
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    if density >= 1:
        mask[:] = True
    elif k > 0:
        mask[tau.reshape(-1).abs().topk(k).indices] = True
    return mask.view(tau.shape)


def threshold_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep |tau| >= the k-th largest |tau| (top-k plus values tied with the k-th: used for bf16)."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    k = int(density * tau.numel())
    thr = tau.reshape(-1).abs().sort(descending=True).values[k - 1]
    return tau.abs() >= thr


AMBIGUOUS: list[torch.Tensor] = []  # sign elections of the last ref_gta call that cancel to ~0


def ref_gta(base, experts, weights, densities, *, sparsify, consensus, normalize, lam=1.0, rescale=True, masks=None):
    """Plain formula of mergekit's generalized task arithmetic, fp32 task vectors, fp64 mixing."""
    AMBIGUOUS.clear()
    b = base.float()
    taus = [e.float() - b for e in experts]
    if sparsify == "magnitude":
        taus = [torch.where(m(t, d), t, 0.0) for t, d, m in zip(taus, densities, [masks] * len(taus), strict=True)]
    elif sparsify == "random":
        taus = [torch.where(m, (t / d) if rescale else t, 0.0) for t, d, m in zip(taus, densities, masks, strict=True)]
    deltas = torch.stack(taus).double()
    # weights as fp32 like mergekit's torch.tensor(weights, dtype=deltas.dtype): the products are then exact in
    # fp64, and an election whose sum cancels to ~0 picks the same sign as the fp32 kernels
    w = torch.tensor(weights, dtype=torch.float32).double().view(-1, *([1] * base.dim()))
    wd = deltas * w
    if consensus:
        total = wd.sum(0)
        # elections whose weighted sum cancels to ~0 are decided by rounding (fp32 in the kernels, fp64 here);
        # bf16 inputs sit on a coarse grid, so exact cancellations (e.g. 0.6*a == 0.8*b) do happen there
        mag = wd.abs().sum(0)
        AMBIGUOUS.append((total.abs() <= 1e-6 * mag) & (mag > 0))
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        agree = (wd.sign() == elected).double()
        mixed = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0).expand_as(mixed).clone()
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return b.double() + lam * mixed


def ref_slerp(t, v0, v1):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    an = a / na if na > 1e-8 else a
    bn = b / nb if nb > 1e-8 else b
    dot = float((an * bn).sum())
    if abs(dot) > 0.9995:
        res = (1 - t) * a + t * b
    else:
        th = math.acos(dot)
        res = math.sin(th * (1 - t)) / math.sin(th) * a + math.sin(th * t) / math.sin(th) * b
    return res.view(v0.shape)


def assert_bf16_ulp(ours: torch.Tensor, ref64: torch.Tensor, name: str):
    """bf16 outputs within 1 ulp of the fp64 reference rounded to bf16; results that cancel to ~0 (where fp32
    accumulation error, ~1e-9 for these inputs of magnitude <= 1, exceeds a bf16 ulp) within 1e-8 absolute."""
    ref = ref64.to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    di = (ours.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    tiny = (ours.double() - ref64).abs() <= 1e-8
    bad = ~((di <= 1) | tiny)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements differ by more than 1 ulp"


def check_against(out_dir, inputs, ref_fn, dtype):
    merged = load_all(out_dir)
    assert set(merged) == set(inputs[0])
    for name in merged:
        AMBIGUOUS.clear()
        ref = ref_fn(name, [m[name] for m in inputs])
        got = merged[name]
        if AMBIGUOUS and AMBIGUOUS[0].any():
            amb = AMBIGUOUS[0]
            assert amb.sum() <= max(2, 1e-3 * amb.numel()), f"{name}: too many ambiguous elections"
            got, ref = got[~amb], ref[~amb]
        if dtype == torch.float32:
            assert merged[name].dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6, msg=name)
        else:
            assert_bf16_ulp(got, ref, name)


# ------------------------------------------------------------------------------------- each method vs formula

METHOD_CASES = [
    ("linear", dict(weights=[0.5, 0.2, 0.3, 1.0])),
    ("linear_nonorm", dict(weights=[0.5, 0.2, 0.3, 0.4], normalize=False)),
    ("task_arithmetic", dict(weights=[0.5, 1.0, -0.3], **{"lambda": 0.8})),
    ("ties", dict(weights=[1.0, 0.6, 0.8], densities=[0.5, 0.3, 0.9])),
    (
        "ties_lambda_nonorm",
        dict(weights=[1.0, 0.6, 0.8], densities=[0.5, 0.3, 1.0], normalize=False, **{"lambda": 1.3}),
    ),
    ("dare_linear", dict(weights=[0.7, 0.5, 0.4], densities=[0.6, 0.8, 0.5], seed=7)),
    ("dare_ties", dict(weights=[0.7, 0.5, 0.4], densities=[0.6, 0.8, 0.5], seed=3)),
    ("dare_ties_norescale", dict(weights=[0.7, 0.5, 0.4], densities=[0.6, 0.8, 0.5], rescale=False, normalize=True)),
    ("slerp", dict(t=0.3)),
]


def _reference(case, cfg_params, base_dir, expert_dirs):
    method = case.split("_nonorm")[0].split("_lambda")[0].split("_norescale")[0]
    p = dict(cfg_params)
    weights, dens = p.pop("weights", None), p.pop("densities", None)
    if method == "linear":
        normalize = p.get("normalize", True)

        def fn(name, ts):
            w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * ts[0].dim()))
            s = (torch.stack([t.double() for t in ts]) * w).sum(0)
            return s / w.sum() if normalize else s

        return fn
    if method == "slerp":
        return lambda name, ts: ref_slerp(p["t"], ts[0], ts[1])
    lam = p.get("lambda", 1.0)
    if method == "task_arithmetic":
        return lambda name, ts: ref_gta(
            ts[0], ts[1:], weights, [1.0] * 3, sparsify=None, consensus=False, normalize=False, lam=lam
        )
    if method == "ties":
        normalize = p.get("normalize", True)
        return lambda name, ts: ref_gta(
            ts[0],
            ts[1:],
            weights,
            dens,
            sparsify="magnitude",
            consensus=True,
            normalize=normalize,
            lam=lam,
            masks=topk_mask if ts[0].dtype == torch.float32 else threshold_mask,
        )
    seed = p.get("seed", 0)
    rescale = p.get("rescale", True)
    normalize = p.get("normalize", False)

    def dare(name, ts):
        masks = [
            dare_keep(dare_seed(seed, name), t, 1 - d, 0, ts[0].numel()).view(ts[0].shape) for t, d in enumerate(dens)
        ]
        return ref_gta(
            ts[0],
            ts[1:],
            weights,
            dens,
            sparsify="random",
            consensus=method == "dare_ties",
            normalize=normalize,
            lam=lam,
            rescale=rescale,
            masks=masks,
        )

    return dare


@pytest.mark.parametrize("kernels", ["torch", "compiled"])  # tiny tensors would take the eager path: force each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,params", METHOD_CASES, ids=[c for c, _ in METHOD_CASES])
def test_method_matches_formula(case, params, dtype, kernels, fam32, fam16, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMERGE_KERNELS", kernels)
    base, experts = fam32 if dtype == torch.float32 else fam16
    method = case.split("_nonorm")[0].split("_lambda")[0].split("_norescale")[0]
    p = dict(params)
    weights, dens = p.pop("weights", None), p.pop("densities", None)
    if method == "linear":
        cfg = cfg_dict("linear", None, [base, *experts], weights=weights, **p)
        inputs = [load_all(d) for d in [base, *experts]]
    elif method == "slerp":
        cfg = cfg_dict("slerp", base, [base, experts[0]], **p)
        inputs = [load_all(d) for d in [base, experts[0]]]
    else:
        cfg = cfg_dict(method, base, experts, weights=weights, densities=dens, **p)
        inputs = [load_all(d) for d in [base, *experts]]
    out = run_merge(cfg, tmp_path / "out", progress=False)
    check_against(out, inputs, _reference(case, params, base, experts), dtype)


def test_dare_is_seeded_and_differs_per_tensor(fam32, tmp_path):
    base, experts = fam32
    mk = lambda seed: cfg_dict("dare_linear", base, experts, weights=[1, 1, 1], densities=[0.5] * 3, seed=seed)
    a = load_all(run_merge(mk(5), tmp_path / "a", progress=False))
    b = load_all(run_merge(mk(5), tmp_path / "b", progress=False))
    c = load_all(run_merge(mk(6), tmp_path / "c", progress=False))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[name], c[name])
    # the CLI --seed overrides the config's seed
    d = load_all(run_merge(mk(5), tmp_path / "d", progress=False, seed=6))
    assert torch.equal(d[name], c[name])
    # two same-shaped tensors get different masks
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(dare_keep(dare_seed(5, q), 0, 0.5, 0, 100), dare_keep(dare_seed(5, o), 0, 0.5, 0, 100))


# ------------------------------------------------------------------------------------ parameter resolution


def test_gradient_and_filter_values():
    assert layer_t("model.embed_tokens.weight", 5) == 0.0
    assert layer_t("lm_head.weight", 5) == 1.0
    assert layer_t("model.norm.weight", 5) == 1.0
    assert layer_t("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_t("transformer.h.3.attn.c_attn.weight", 4) == 1.0
    # gradients interpolate linearly over t
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 0.5, 1.0], "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting([1, 0, 1], "x", 0.5) == pytest.approx(0.0)
    # first matching filter wins; an entry without filter is the default
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting(t, "model.layers.1.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(t, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.9
    assert evaluate_setting(t, "model.norm.weight", 1.0) == 0.5


def test_per_layer_weights_and_filters(fam32, tmp_path):
    """task_arithmetic with a weight gradient for one expert and a filtered weight for another."""
    base, experts = fam32
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(experts[0]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(experts[1]), "parameters": {"weight": [{"filter": "mlp", "value": 0.25}, {"value": 0.75}]}},
        ],
        "parameters": {"lambda": 0.5},
    }
    out = load_all(run_merge(cfg, tmp_path / "o", progress=False))
    b, e0, e1 = load_all(base), load_all(experts[0]), load_all(experts[1])
    for name, got in out.items():
        t = layer_t(name, NUM_LAYERS)
        w0 = t
        w1 = 0.25 if "mlp" in name else 0.75
        ref = b[name].double() + 0.5 * (w0 * (e0[name].double() - b[name]) + w1 * (e1[name].double() - b[name]))
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6, msg=name)
    assert {block_name(n) for n in out} >= {"embed", "head", "layers.2"}


def test_slerp_with_filtered_gradient_and_slices(fam32, tmp_path):
    """The common mergekit slerp YAML (slices covering every layer, t per filter) runs unchanged."""
    base, experts = fam32
    text = f"""
slices:
  - sources:
      - model: {base}
        layer_range: [0, {NUM_LAYERS}]
      - model: {experts[2]}
        layer_range: [0, {NUM_LAYERS}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    p = tmp_path / "slerp.yml"
    p.write_text(text)
    assert main(["merge", str(p), str(tmp_path / "o"), "--no-progress"]) == 0
    out = load_all(tmp_path / "o")
    b, e = load_all(base), load_all(experts[2])
    tv = yaml.safe_load(text)["parameters"]["t"]
    for name, got in out.items():
        t = evaluate_setting(tv, name, layer_t(name, NUM_LAYERS))
        torch.testing.assert_close(got.double(), ref_slerp(t, b[name], e[name]), atol=1e-6, rtol=1e-6, msg=name)


# ------------------------------------------------------------------------- CLI end to end + transformers


def _ref_state_dict(base, experts, weights, densities):
    b, es = load_all(base), [load_all(e) for e in experts]
    return {
        n: ref_gta(
            b[n],
            [e[n] for e in es],
            weights,
            densities,
            sparsify="magnitude",
            consensus=True,
            normalize=True,
            masks=topk_mask,
        ).float()
        for n in b
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cli_ties_yaml_loads_and_logits_match(arch, tmp_path):
    base, experts = make_family(tmp_path / "fam", arch, n_experts=3, seed=3)
    weights, dens = [1.0, 0.5, 0.7], [0.5, 0.5, 0.7]
    cfg = {
        "models": [{"model": str(base)}]
        + [
            {"model": str(e), "parameters": {"weight": w, "density": d}}
            for e, w, d in zip(experts, weights, dens, strict=True)
        ],
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    yml = tmp_path / "ties.yml"
    yml.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "merged"
    assert main(["merge", str(yml), str(out), "--shard-size", "30KB", "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1

    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    sd = _ref_state_dict(base, experts, weights, dens)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    for n, v in merged.state_dict().items():
        if n in sd:
            torch.testing.assert_close(v, sd[n], atol=1e-6, rtol=1e-6, msg=n)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(base)(ids).logits)


def test_dtype_override_updates_config(fam32, tmp_path):
    base, experts = fam32
    cfg = cfg_dict("task_arithmetic", base, experts, weights=[0.3, 0.3, 0.3])
    out = run_merge(cfg, tmp_path / "o", dtype="bfloat16", progress=False)
    conf = json.loads((out / "config.json").read_text())
    assert conf.get("torch_dtype", conf.get("dtype")) == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_all(out).values())
    m = AutoModelForCausalLM.from_pretrained(out)
    assert next(m.parameters()).dtype == torch.bfloat16
    rec = json.loads((out / "blockmerge_config.json").read_text())
    assert rec["merge_method"] == "task_arithmetic"


def test_progress_and_final_line(fam32, tmp_path, capsys):
    base, experts = fam32
    cfg = cfg_dict("linear", None, [base, *experts], weights=[1, 1, 1, 1])
    run_merge(cfg, tmp_path / "o", progress=True)
    cap = capsys.readouterr()
    assert "peak RSS" in cap.out and "GB/s" in cap.out
    assert "block 5/5" in cap.err


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c.update(merge_method="frankenmerge"), "merge_method"),
        (lambda c: c.update(colour="blue"), "colour: unknown field"),
        (lambda c: c["models"][0]["parameters"].pop("weight"), "'weight' is required"),
        (lambda c: c["models"][0]["parameters"].update(gamma=0.1), "models.0.parameters.gamma"),
        (lambda c: c["parameters"].update(normalise=True), "parameters.normalise"),
        (lambda c: c.update(tokenizer_source="/nonexistent/model"), "tokenizer_source: model"),
        (lambda c: c.update(base_model="/nonexistent/model"), "base_model"),
        (lambda c: c.pop("base_model"), "base_model: required"),
        (lambda c: c["models"][0]["parameters"].update(density=1.5), "density"),
        (lambda c: c.update(dtype="float8"), "dtype"),
        (lambda c: c["models"][0]["parameters"].update(weight=[{"filtr": "mlp", "value": 1}]), "filtr"),
        (
            lambda c: c.update(
                slices=[{"sources": [{"model": c["base_model"], "layer_range": [0, 1]}]}] * 2, models=[]
            ),
            "slices: not supported",
        ),
        (
            lambda c: c.update(
                slices=[{"sources": [{"model": m["model"], "layer_range": [0, 2]} for m in c["models"]]}], models=[]
            ),
            "slices: not supported (layer_range [0, 2]",
        ),
    ],
)
def test_config_errors_name_the_field(fam32, tmp_path, mutate, needle):
    base, experts = fam32
    cfg = cfg_dict("ties", base, experts, weights=[1, 1, 1], densities=[0.5] * 3)
    mutate(cfg)
    with pytest.raises(ConfigError) as ei:
        run_merge(cfg, tmp_path / "o", progress=False)
    assert needle in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_yaml_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: ties\nmodels: [\n  - model: x\n")
    with pytest.raises(ConfigError, match="bad.yml: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yml")


def test_top_level_defaults_and_model_overrides(fam32, tmp_path):
    """mergekit reads a model's parameter from the model entry first, then from the top-level parameters."""
    base, experts = fam32
    cfg = {
        "merge_method": "dare_linear",
        "base_model": str(base),
        "models": [
            {"model": str(experts[0])},
            {"model": str(experts[1]), "parameters": {"weight": 0.25}},
            {"model": str(experts[2]), "parameters": {"density": 1.0}},
        ],
        "parameters": {"weight": 0.5, "density": 0.6, "seed": 11},
    }
    out = load_all(run_merge(cfg, tmp_path / "o", progress=False))
    ins = [load_all(d) for d in [base, *experts]]
    name = "model.layers.1.mlp.down_proj.weight"
    ts = [m[name] for m in ins]
    masks = [
        dare_keep(dare_seed(11, name), t, 1 - d, 0, ts[0].numel()).view(ts[0].shape)
        for t, d in enumerate([0.6, 0.6, 1.0])
    ]
    ref = ref_gta(
        ts[0],
        ts[1:],
        [0.5, 0.25, 0.5],
        [0.6, 0.6, 1.0],
        sparsify="random",
        consensus=False,
        normalize=False,
        masks=masks,
    )
    torch.testing.assert_close(out[name].double(), ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ method registry


def test_registry_drives_validation_planning_and_help(fam32, tmp_path, monkeypatch, capsys):
    """A method is one registry entry and one tensor function: a toy method added at run time is accepted
    by the config, planned (its parameters resolved, ranges checked) and listed by `merge --help`."""
    from blockmerge.merge import registry

    def shift(c):  # out = base + offset * (model - base)
        return (c.base.double() + c.g["offset"] * (c.models[0].double() - c.base.double())).to(c.out_dtype)

    toy = registry.Method(
        "toy_shift", "base moved towards one model", shift, (), (registry.Param("offset", 0.5, low=0.0),), models_max=1
    )
    monkeypatch.setitem(registry.REGISTRY, "toy_shift", toy)
    base, experts = fam32
    cfg = {"merge_method": "toy_shift", "base_model": str(base), "models": [{"model": str(experts[0])}]}
    out = load_all(run_merge({**cfg, "parameters": {"offset": 0.25}}, tmp_path / "o", progress=False))
    b, e = load_all(base), load_all(experts[0])
    for name, v in out.items():
        torch.testing.assert_close(v.double(), b[name].double() + 0.25 * (e[name].double() - b[name].double()))
    with pytest.raises(ConfigError, match=r"parameters.offset: -1.0 for tensor .*, expected 0 <= offset"):
        run_merge({**cfg, "parameters": {"offset": -1.0}}, tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="toy_shift merges base_model with exactly one other model, got 2 others"):
        run_merge({**cfg, "models": [{"model": str(x)} for x in experts[:2]]}, tmp_path / "bad", progress=False)
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = capsys.readouterr().out
    for name, m in registry.REGISTRY.items():
        assert f"  {name} " in help_text and m.summary in help_text
    assert "offset=0.5 [0 <= offset]" in help_text
