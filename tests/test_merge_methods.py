"""mergekit methods added through the registry (breadcrumbs, della, model_stock, nearswap, ...), each merged
end to end on a tiny synthetic family and checked tensor by tensor against its formula written here in
float64 (numpy ranks, stacked task vectors), independently of engine/merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from blockmerge.kernels import hash_uniform, task_key
from blockmerge.merge.config import ConfigError
from blockmerge.merge.methods import dare_seed
from blockmerge.merge.run import run_merge
from blockmerge.suite.synth import make_family
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), "llama", n_experts=3, seed=5, dtype=torch.float32)


def load_all(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(d).glob("*.safetensors")) for k, v in load_file(f).items()}


def merge(method, base, experts, tmp_path, per_model=(), **params):
    per_model = per_model or [{}] * len(experts)
    models = [{"model": str(e), "parameters": dict(p)} for e, p in zip(experts, per_model, strict=True)]
    cfg = {"merge_method": method, "base_model": str(base), "models": models, "parameters": params}
    return load_all(run_merge(cfg, tmp_path / method, progress=False))


def inputs(base, experts):
    return load_all(base), [load_all(e) for e in experts]


def ref_mix(base, taus, weights, *, sign, normalize, lam=1.0):
    """mergekit's generalized task arithmetic on already sparsified task vectors (float64)."""
    d = torch.stack(taus).double()
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    wd = d * w
    if sign:
        majority = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
        mask = (torch.sign(wd) == majority).double()
        mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), w.sum()
        div = div if abs(div) >= 1e-8 else 1.0
    return base.double() + lam * (mixed / div if normalize else mixed)


def ref_breadcrumbs(tau, density, gamma):
    a = tau.double().numpy().reshape(-1)
    n = a.size
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    ranked = np.argsort(np.abs(a), kind="stable")  # smallest first
    chosen = ranked[bottom : n - top]
    assert len(chosen) == keep and (top == 0 or np.abs(a[chosen]).max() <= np.abs(a[ranked[n - top :]]).min())
    out = np.zeros(n)
    out[chosen] = a[chosen]
    return torch.from_numpy(out).view(tau.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_formula(fam, tmp_path, method):
    base, experts = fam
    weights, dens, gammas = [1.0, 0.5, 0.8], [0.6, 0.9, 0.3], [0.05, 0.01, 0.8]  # the last: fewer outliers cut
    pm = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, dens, gammas, strict=True)]
    out = merge(method, base, experts, tmp_path, pm, **{"lambda": 0.9})
    b, es = inputs(base, experts)
    for name, got in out.items():
        taus = [
            ref_breadcrumbs(e[name].double() - b[name].double(), d, g) for e, d, g in zip(es, dens, gammas, strict=True)
        ]
        want = ref_mix(b[name], taus, weights, sign=method.endswith("ties"), normalize=False, lam=0.9)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)


def ref_della_keep_prob(tau, density, epsilon):
    rows = tau.double().numpy().reshape(1, -1) if tau.dim() < 2 else tau.double().numpy()
    m = rows.shape[1]
    rank = np.empty_like(rows)
    for r in range(rows.shape[0]):
        rank[r, np.argsort(np.abs(rows[r]), kind="stable")] = np.arange(m)
    return torch.from_numpy(density - epsilon + 2 * epsilon * rank / (m - 1)).view(tau.shape)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_formula_and_is_seeded(fam, tmp_path, method):
    base, experts = fam
    weights, dens, eps = [1.0, 0.7, 0.4], [0.5, 0.7, 0.4], [0.2, 0.1, 0.3]
    pm = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, dens, eps, strict=True)]
    out = merge(method, base, experts, tmp_path, pm, seed=4)
    b, es = inputs(base, experts)
    kept = total = 0
    for name, got in out.items():
        seed = dare_seed(4, name)
        taus = []
        for t, (e, d, ep) in enumerate(zip(es, dens, eps, strict=True)):
            tau = e[name].double() - b[name].double()
            p = ref_della_keep_prob(tau, d, ep)
            u = hash_uniform(task_key(seed, t), torch.arange(tau.numel())).double().view(tau.shape)
            keep = u >= 1.0 - p.float().double()
            kept, total = kept + int(keep.sum()), total + keep.numel()
            dropped = torch.where(keep, tau, 0.0)  # rescaled as mergekit: to the L1 norm of tau
            taus.append(dropped * (tau.abs().sum() / dropped.abs().sum()) if dropped.abs().sum() > 1e-7 else dropped)
        want = ref_mix(b[name], taus, weights, sign=method == "della", normalize=method == "della")
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)
    assert abs(kept / total - sum(dens) / 3) < 0.01  # the keep probabilities average to density
    again = merge(method, base, experts, tmp_path / "again", pm, seed=4)
    other = merge(method, base, experts, tmp_path / "other", pm, seed=5)
    assert all(torch.equal(out[n], again[n]) for n in out)
    assert not all(torch.equal(out[n], other[n]) for n in out)


def test_della_rescale_keeps_the_l1_norm():
    """With rescale, the kept entries are tau's own, all scaled by one factor that restores ||tau||_1."""
    from blockmerge.merge.sparse import della_prune

    tau = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for key in range(5):
        out, plain = della_prune(tau, 0.5, 0.2, True, key), della_prune(tau, 0.5, 0.2, False, key)
        kept = plain != 0
        assert 0.4 < kept.float().mean() < 0.6 and torch.equal(plain[kept], tau[kept]) and not plain[~kept].any()
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
        torch.testing.assert_close(out, plain * (tau.abs().sum() / plain.abs().sum()))


def test_della_epsilon_out_of_range_is_a_config_error(fam, tmp_path):
    base, experts = fam
    pm = [{"weight": 1.0, "density": 0.5, "epsilon": 0.5}] * 3
    with pytest.raises(ConfigError, match=r"models.0.parameters.epsilon: 0.5 with density 0.5, expected density"):
        merge("della", base, experts, tmp_path, pm)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_formula(fam, tmp_path, filter_wise):
    base, experts = fam
    out = merge("model_stock", base, experts, tmp_path, filter_wise=filter_wise)
    b, es = inputs(base, experts)
    for name, got in out.items():
        w0 = b[name].double()
        shape = (1, -1) if (w0.dim() < 2 or not filter_wise) else (w0.shape[0], -1)
        taus = [(e[name].double() - w0).reshape(shape) for e in es]
        coss = []
        for i in range(3):
            for j in range(i + 1, 3):
                c = (taus[i] * taus[j]).sum(-1) / (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
                coss.append(c.clamp(-1, 1))
        cos = torch.stack(coss).mean(0).unsqueeze(-1)
        t = 3 * cos / (1 + 2 * cos)
        avg = sum(e[name].double() for e in es).reshape(shape) / 3
        want = (t * avg + (1 - t) * w0.reshape(shape)).view(w0.shape)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)


def test_model_stock_needs_two_models(fam, tmp_path):
    base, experts = fam
    with pytest.raises(ConfigError, match="model_stock needs at least 2 models besides base_model, got 1"):
        merge("model_stock", base, experts[:1], tmp_path)


def test_nearswap_matches_formula(fam, tmp_path):
    base, experts = fam
    out = merge("nearswap", base, experts[:1], tmp_path, t=0.02)
    b, (e,) = inputs(base, experts[:1])
    for name, got in out.items():
        x, y = b[name].double(), e[name].double()
        diff = (x - y).abs()
        w = torch.where(diff > 0, (0.02 / diff).clamp(max=1.0), 1.0)
        torch.testing.assert_close(got.double(), x * (1 - w) + y * w, atol=2e-6, rtol=1e-5, msg=name)
        assert 0 < (w < 1).float().mean() < 1  # t in the range of the differences: a real mix


# ------------------------------------------------------------------------------ spherical: float64 formulas


def ref_multislerp(xs, w, normalize=True, eps=1e-8):
    """Tangent-space barycentre: project the unit vectors to the tangent space at their normalised weighted
    mean, average there, map back with the exponential map, scale by the weighted mean norm."""
    x = torch.stack([v.double().reshape(-1) for v in xs])
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = x.norm(dim=-1, keepdim=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((u - (u @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (res * (norms.squeeze(-1) * w).sum()).view(xs[0].shape)


def ref_slerp_vectors(t, v0, v1):
    """slerp of each row (last dimension) of v0, v1; lerp where colinear."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    return torch.where(s.abs() < 1e-8, (1 - t) * v0 + t * v1, out)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """Fixed-point iteration for the Riemannian mean on the unit sphere (equal weights), times the mean norm."""
    x = [v.double().reshape(-1) for v in xs]
    norms = [float(v.norm()) for v in x]
    units = [v / n for v, n in zip(x, norms, strict=True)]
    a = 1.0 / len(units)
    mean = sum(a * u for u in units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            d = torch.clamp(mean @ u, -1.0, 1.0)
            theta = torch.arccos(d)
            if theta >= tol:
                tangent += a * theta / torch.sin(theta) * (u - d * mean)
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(norms) / len(norms) * mean).view(xs[0].shape)


def merge_no_base(method, models, tmp_path, per_model=(), **params):
    per_model = per_model or [{}] * len(models)
    cfg = {"merge_method": method, "parameters": params}
    cfg["models"] = [{"model": str(m), "parameters": dict(p)} for m, p in zip(models, per_model, strict=True)]
    return load_all(run_merge(cfg, tmp_path / method, progress=False))


@pytest.mark.parametrize("with_base", [False, True], ids=["models", "task_vectors"])
def test_multislerp_matches_formula(fam, tmp_path, with_base):
    base, experts = fam
    w = [0.5, 0.3, 0.9]
    pm = [{"weight": x} for x in w]
    if with_base:
        out = merge("multislerp", base, experts, tmp_path, pm)
    else:
        out = merge_no_base("multislerp", experts, tmp_path, pm)
    b, es = inputs(base, experts)
    for name, got in out.items():
        x0 = b[name].double() if with_base else 0.0
        want = x0 + ref_multislerp([e[name].double() - x0 for e in es], w)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("flatten,row_wise,with_base", [(True, False, False), (True, False, True), (False, False, True),
                                                        (False, True, False)])  # fmt: skip
def test_nuslerp_matches_formula(fam, tmp_path, flatten, row_wise, with_base):
    base, experts = fam
    pm = [{"weight": 0.4}, {"weight": 1.2}]  # t = 0.75
    g = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    if with_base:
        out = merge("nuslerp", base, experts[:2], tmp_path, pm, **g)
    else:
        out = merge_no_base("nuslerp", experts[:2], tmp_path, pm, **g)
    b, es = inputs(base, experts[:2])
    for name, got in out.items():
        x0 = b[name].double() if with_base else torch.zeros_like(b[name].double())
        v0, v1 = (e[name].double() - x0 for e in es)
        if flatten:
            want = ref_slerp_vectors(0.75, v0.reshape(1, -1), v1.reshape(1, -1)).view(v0.shape)
        elif row_wise:  # vectors along the first dimension
            want = ref_slerp_vectors(0.75, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
        else:
            want = ref_slerp_vectors(0.75, v0, v1)
        torch.testing.assert_close(got.double(), x0 + want, atol=2e-6, rtol=1e-5, msg=name)


def test_karcher_matches_formula(fam, tmp_path):
    base, experts = fam
    models = [base, *experts]
    out = merge_no_base("karcher", models, tmp_path, max_iter=20, tol=1e-9)
    ins = [load_all(m) for m in models]
    for name, got in out.items():
        want = ref_karcher([m[name] for m in ins], max_iter=20, tol=1e-9)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)


def test_karcher_iterates_on_spread_points():
    """Far-apart points (where the Riemannian mean differs from the normalised average), on a TensorCall."""
    from blockmerge.merge.call import TensorCall
    from blockmerge.merge.spherical import karcher

    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 50, generator=gen) * s for s in (1.0, 2.0, 0.5)]
    xs[1] += 2 * xs[0]
    got = karcher(TensorCall("w", None, xs, [{}] * 3, {"max_iter": 50, "tol": 1e-9}, torch.float32))
    want = ref_karcher(xs, max_iter=50, tol=1e-9)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    first = ref_karcher(xs, max_iter=0)  # the normalised average before any step
    assert (want - first).abs().max() > 1e-2


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_formula(fam, tmp_path, select_topk):
    base, experts = fam
    out = merge("sce", base, experts, tmp_path, select_topk=select_topk)
    b, es = inputs(base, experts)
    for name, got in out.items():
        x0 = b[name].double()
        d = np.stack([(e[name].double() - x0).numpy().reshape(-1) for e in es])
        if select_topk < 1:
            var = d.var(axis=0)
            k = int(select_topk * np.count_nonzero(var))
            d[:, np.argsort(-var, kind="stable")[k:]] = 0.0
        w = (d**2).mean(axis=1)
        w = w / w.sum()
        agree = np.sign(d) == np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
        num, den = (d * w[:, None] * agree).sum(0), (w[:, None] * agree).sum(0)
        want = x0 + torch.from_numpy(num / np.where(den == 0, 1.0, den)).view(x0.shape)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)


def test_arcee_fusion_matches_formula(fam, tmp_path):
    base, experts = fam
    out = merge("arcee_fusion", base, experts[:1], tmp_path)
    b, (e,) = inputs(base, experts[:1])
    fused = 0
    for name, got in out.items():
        x, y = b[name].double().numpy(), e[name].double().numpy()
        px = np.exp(y - y.max(-1, keepdims=True))
        px = px / px.sum(-1, keepdims=True) + 1e-8
        qx = np.exp(x - x.max(-1, keepdims=True))
        qx = qx / qx.sum(-1, keepdims=True) + 1e-8
        imp = np.abs(y - x) * (px * np.log(px / qx)).sum(-1, keepdims=True)
        srt = np.sort(imp.reshape(-1))
        q1, med, q3 = (srt[int(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75))
        thr = med + 1.5 * (q3 - q1)
        mask = imp >= thr
        fused += mask.sum()
        sure = torch.from_numpy(np.abs(imp - thr) > 1e-5 * thr)  # fp32 rounding may flip the ties at thr
        assert sure.float().mean() > 0.99
        want = torch.from_numpy(np.where(mask, y, x))
        torch.testing.assert_close(got.double()[sure], want[sure], atol=1e-7, rtol=0, msg=name)
    assert fused > 0


def test_passthrough_scales_one_model(fam, tmp_path):
    base, experts = fam
    scale = [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]
    out = merge_no_base("passthrough", experts[:1], tmp_path, [{"scale": scale}])
    (e,) = [load_all(experts[0])]
    for name, got in out.items():
        torch.testing.assert_close(got, e[name] * (0.5 if "mlp" in name else 1.0), msg=name)
    with pytest.raises(ConfigError, match="passthrough merges at most 1 model, got 2"):
        merge_no_base("passthrough", experts[:2], tmp_path / "two")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_matches_formula(fam, tmp_path, method):
    base, experts = fam
    params = {"epsilon": 2e-3} | ({"r": 0.5, "alpha": 0.9} if method == "ramplus_tl" else {})
    out = merge(method, base, experts, tmp_path, **params)
    b, es = inputs(base, experts)
    kinds = np.zeros(4, dtype=int)  # entries changed by 0, 1, 2, 3 models
    for name, got in out.items():
        x0 = b[name].double().numpy().reshape(-1)
        d = np.stack([e[name].double().numpy().reshape(-1) - x0 for e in es])
        on = np.abs(d) > 2e-3
        count = on.sum(0)
        kinds += np.bincount(count, minlength=4)
        merged = np.zeros_like(x0)
        for t in range(len(d)):
            boost = 1.0
            if method == "ramplus_tl":
                shared, unique = (on[t] & (count > 1)).sum(), (on[t] & (count == 1)).sum()
                boost = 1 + 0.5 * min(max(shared / max(unique, 2e-3), 0.0), 0.9)
            for i in np.nonzero(on[t])[0]:
                merged[i] += d[t, i] * (boost if count[i] == 1 else 1.0 / count[i])
        want = torch.from_numpy(x0 + merged).view(b[name].shape)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5, msg=name)
    assert (kinds > 0).all(), kinds  # every case (unchanged, unique, shared) occurs


# ------------------------------------------------------------------------------ frankenmerges (slices)


def test_passthrough_slices_stack_layers(fam, tmp_path):
    """Layers 0-1 of expert 0 then layers 1-2 of expert 1 (scaled 0.5 in the mlp): 4 layers that load with
    transformers, each tensor the planned source's."""
    from transformers import AutoModelForCausalLM

    base, experts = fam
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [1, 3], "parameters": {"scale": [
                {"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
        ],
        "dtype": "bfloat16",
    }  # fmt: skip
    out = run_merge(cfg, tmp_path / "franken", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    got = load_all(out)
    e0, e1 = load_all(experts[0]), load_all(experts[1])
    want = {n: v for n, v in e0.items() if ".layers." not in n or ".layers.0." in n or ".layers.1." in n}
    for src, dst in ((1, 2), (2, 3)):
        for n, v in e1.items():
            if f".layers.{src}." in n:
                want[n.replace(f".layers.{src}.", f".layers.{dst}.")] = v * (0.5 if "mlp" in n else 1.0)
    for n in ("model.norm.weight", "lm_head.weight"):
        if n in e1:
            want[n] = e1[n]
    assert set(got) == set(want)
    for n, v in got.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[n].to(torch.bfloat16)), n
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_passthrough_slices_bad_range_is_a_config_error(fam, tmp_path):
    base, experts = fam
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [2, 5]}]}]}
    with pytest.raises(ConfigError, match=r"slices.0.sources.0.layer_range: \[2, 5\] is not a range of the 3"):
        run_merge(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
