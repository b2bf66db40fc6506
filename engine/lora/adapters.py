"""LoRA adapters: read PEFT adapters, merge them into a new adapter or into the base model, and the
`blockmerge lora` command (merge, merge-into-base, divmerge; the learner is in lora_learn.py).

An adapter module m of adapter t adds s_t * B_t A_t to the base weight W0 (A_t: [r, in], B_t: [out, r];
s_t = alpha/r, or alpha/sqrt(r) with rslora). Adapter merges follow PEFT's `add_weighted_adapter`:

  cat              A = [w_1 s_1 A_1; ...; w_T s_T A_T], B = [B_1 ... B_T]          exact, rank sum_t r_t
  linear           A = sum_t sign(w_t s_t) sqrt|w_t s_t| A_t, B = sum_t sqrt|w_t s_t| B_t   (same ranks)
  ties, dare_*, magnitude_prune   the same per-factor weights, PEFT's ties/dare formula on A and on B
  svd              D = sum_t w_t s_t B_t A_t per module, truncated SVD: B = U S, A = V^T   (rank --rank)
  ties_svd, dare_ties_svd, dare_linear_svd, magnitude_prune_svd   PEFT's formula on the deltas s_t B_t A_t,
                   then the truncated SVD
The merged adapter has lora_alpha = r (scale 1), like PEFT's. Only one module's deltas exist at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, check_finite
from blockmerge.io.commit import claim_output
from blockmerge.io.dtypes import parse_dtype

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

ADAPTER_METHODS = (
    "cat",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
DENSITY_METHODS = {m for m in ADAPTER_METHODS if m.startswith(("ties", "dare", "magnitude"))}


class AdapterError(ValueError):
    """An adapter is missing, malformed, unsupported or does not fit the base / the other adapters."""


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = scale * B @ A (transposed when fan_in_fan_out)."""

    name: str  # module path inside the model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this module adapts."""
        out_f, in_f = self.B.shape[0], self.A.shape[1]
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B @ A in the base weight's layout."""
        d = (self.B.to(dtype) @ self.A.to(dtype)).mul_(self.scale)
        return d.T if self.fan_in_fan_out else d


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def r(self) -> int:
        """The largest rank the config allows (PEFT's rule for the rank of merged adapters)."""
        return max([int(self.config["r"]), *(int(v) for v in (self.config.get("rank_pattern") or {}).values())])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype

    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())

    def __repr__(self) -> str:
        return f"Adapter({str(self.path)!r}, r={self.config.get('r')}, {len(self.modules)} modules)"


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as e:
            raise AdapterError(f"{st}: cannot read safetensors file ({e})") from e
    if legacy.exists():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{legacy}: cannot read ({e})") from e
    raise AdapterError(f"{path}: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})")


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter folder")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise AdapterError(f"{path}: no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for f in ("r", "lora_alpha"):
        if not isinstance(config.get(f), (int, float)) or isinstance(config.get(f), bool) or config[f] <= 0:
            raise AdapterError(f"{cfg_file}: field {f!r} must be a positive number, got {config.get(f)!r}")
    for f in ("use_dora", "lora_bias"):
        if config.get(f):
            raise AdapterError(f"{cfg_file}: {f}=true is not supported")
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    tensors = _load_tensors(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if m is None:
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: tensor {key} is not a LoRA linear factor (lora_A/lora_B); "
                "embedding/conv LoRA, DoRA and modules_to_save are not supported"
            )
        halves.setdefault(m["module"], {})[m["which"]] = t
    if not halves:
        raise AdapterError(f"{path / WEIGHTS_NAME}: no LoRA tensors")
    adapter = Adapter(path, config)
    for module in sorted(halves, key=natural_key):
        h = halves[module]
        if set(h) != {"A", "B"}:
            missing = "lora_B" if "A" in h else "lora_A"
            raise AdapterError(f"{path / WEIGHTS_NAME}: module {module} has no {missing}")
        A, B = h["A"], h["B"]
        for which, t in (("lora_A", A), ("lora_B", B)):
            check_finite(t, str(path / WEIGHTS_NAME), f"{module}.{which}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: module {module}: lora_A {list(A.shape)} and lora_B {list(B.shape)} "
                "are not [r, in] and [out, r]"
            )
        r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        if A.shape[0] != r:
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: module {module} has rank {A.shape[0]} but {CONFIG_NAME} says r={r}"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        adapter.modules[module] = LoraModule(module, A, B, lora_scale(alpha, r, use_rslora), fan_in_fan_out)
    return adapter


def natural_key(name: str) -> list:
    """Sort module names with layer numbers in numeric order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def base_tensor_name(module: str, base: Checkpoint) -> str:
    """The base checkpoint tensor adapted by `module` (exact, then with/without a `model.` prefix)."""
    for cand in (f"{module}.weight", f"model.{module}.weight", module.removeprefix("model.") + ".weight"):
        if cand in base.tensors:
            return cand
    raise AdapterError(f"{base.path}: no weight tensor for adapted module {module} (looked for {module}.weight)")


def check_shared_base(
    adapters: Sequence[Adapter], base: Checkpoint | None = None, *, base_given: bool = False
) -> dict[str, str] | None:
    """Adapters must be for the same base: the same base_model_name_or_path (unless a base is given
    explicitly), the same weight shapes where they adapt the same module and, with a base checkpoint, shapes
    that fit its tensors. Returns {module: base tensor name} when a base is given."""
    if not adapters:
        raise AdapterError("no adapters given")
    if not base_given and base is None:
        names = {a.base_model for a in adapters if a.base_model}
        if len(names) > 1:
            a0 = next(a for a in adapters if a.base_model)
            other = next(a for a in adapters if a.base_model and a.base_model != a0.base_model)
            raise AdapterError(
                f"{other.path}: base_model_name_or_path {other.base_model!r} differs from {a0.path}'s "
                f"{a0.base_model!r} (pass --base to merge them anyway)"
            )
    kinds = {type(a.config.get("target_modules")).__name__ for a in adapters}
    if len(kinds) > 1:
        raise AdapterError("adapters mix target_modules given as a regex string and as a list; cannot combine")
    shapes: dict[str, tuple[tuple[int, int], Path]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            seen = shapes.get(name)
            if seen is None:
                shapes[name] = (m.weight_shape, a.path)
            elif seen[0] != m.weight_shape:
                raise AdapterError(
                    f"{a.path}: module {name} adapts a weight of shape {list(m.weight_shape)}, "
                    f"{seen[1]} one of shape {list(seen[0])}: not the same base"
                )
    if base is None:
        return None
    names = {}
    for name, (shape, apath) in shapes.items():
        tname = base_tensor_name(name, base)
        bshape = base.tensors[tname].shape
        if tuple(bshape) != shape:
            raise AdapterError(
                f"{apath}: module {name} adapts a weight of shape {list(shape)}, but {base.path} tensor {tname} "
                f"has shape {list(bshape)}"
            )
        names[name] = tname
    return names


def read_adapters(paths: Sequence[str | Path], base: Checkpoint | None = None, base_given: bool = False):
    adapters = [read_adapter(p) for p in paths]
    names = check_shared_base(adapters, base, base_given=base_given)
    return adapters, names


# ---------------------------------------------------------------------------------- PEFT merge formulas
# Written after peft.utils.merge_utils (PEFT's add_weighted_adapter): the TIES sign election is over the
# unweighted pruned tensors ("total" or "frequency") and the disjoint mean divides by the number of agreeing
# tasks, which differs from mergekit's TIES used for full checkpoints.


def dare_mask(shape, density: float, seed: int, module: str, task: int, part: str) -> torch.Tensor:
    """DARE keep-mask (Bernoulli(density)) of one task's tensor of one module: seeded per (seed, module,
    task, part) so the result does not depend on the order modules are processed in."""
    h = hashlib.blake2b(f"{seed}|{module}|{task}|{part}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return torch.bernoulli(torch.full(tuple(shape), float(density)), generator=g)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, mask: torch.Tensor) -> torch.Tensor:
    if density >= 1:
        return t
    return t * mask.to(t.dtype) / density


def combine_tasks(
    method: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    masks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune over tensors of one module.
    `method` without an `_svd` suffix; `masks` are the DARE keep-masks (one per tensor)."""
    if method in ("linear", "svd"):
        pruned = tensors
    elif method in ("ties", "magnitude_prune"):
        pruned = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        pruned = [_random_prune(t, density, m) for t, m in zip(tensors, masks, strict=True)]
    else:
        raise AdapterError(f"unknown method {method!r}")
    stacked = torch.stack(pruned, dim=0)
    w = weights.to(stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    if majority_sign_method == "total":
        magnitude = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise AdapterError(f"majority_sign_method {majority_sign_method!r}: expected total or frequency")
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def truncated_svd(
    delta: torch.Tensor, rank: int, *, clamp: float | None = None, full_matrices: bool = False, driver=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of delta: A = V^T[:rank], B = U[:, :rank] S.
    Padded with zeros when delta has fewer singular values than rank. clamp: PEFT's svd_clamp quantile."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        dist = torch.cat([B.flatten(), A.flatten()])
        hi = torch.quantile(dist, clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


@dataclass
class MergedAdapter:
    config: dict
    tensors: dict[str, torch.Tensor]  # PEFT names: base_model.model.<module>.lora_A.weight


def _target_modules(adapters: Sequence[Adapter]):
    tms = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in tms):
        return "|".join(f"({t})" for t in tms)
    out: set[str] = set()
    for t in tms:
        out |= set(t or [])
    return sorted(out)


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    method: str = "svd",
    *,
    density: float | None = None,
    rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = False,
    svd_driver: str | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    mask_fn=None,
) -> MergedAdapter:
    """Combine adapters into one adapter as PEFT's add_weighted_adapter does (see the module docstring).
    mask_fn(shape, density, seed, module, task, part) replaces `dare_mask` (tests use it to feed PEFT the
    same DARE masks)."""
    if method not in ADAPTER_METHODS:
        raise AdapterError(f"unknown method {method!r}: expected one of {', '.join(ADAPTER_METHODS)}")
    T = len(adapters)
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    if len(weights) != T:
        raise AdapterError(f"--weights: expected {T} values (one per adapter), got {len(weights)}")
    if rank is not None and not method.endswith("svd"):
        raise AdapterError(f"--rank applies to the svd methods only, not to {method}")
    if T == 1:
        method, rank = "linear", None  # PEFT: a single adapter is always merged linearly
    if any(not math.isfinite(w) for w in weights):
        raise AdapterError(f"--weights: {weights} must be finite numbers")
    if method in DENSITY_METHODS:
        if density is None:
            raise AdapterError(f"method {method} needs --density")
        if method.startswith("dare") and not 0 < density <= 1:  # DARE rescales the kept values by 1/density
            raise AdapterError(f"--density must be in (0, 1] for {method}, got {density}")
        if not 0 <= density <= 1:
            raise AdapterError(f"--density must be in [0, 1], got {density}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise AdapterError(f"--svd-clamp must be a quantile in [0, 1], got {svd_clamp}")
    mask_fn = mask_fn or dare_mask
    ranks = [a.r for a in adapters]
    svd = method.endswith("svd")
    if method == "cat":
        new_rank = sum(ranks)
    elif svd:
        new_rank = rank if rank is not None else max(ranks)
    else:
        if len(set(ranks)) != 1:
            raise AdapterError(f"method {method} needs adapters of the same rank, got r={ranks} (use cat or svd)")
        new_rank = ranks[0]
    if new_rank <= 0:
        raise AdapterError(f"--rank must be positive, got {new_rank}")
    out_dtype = dtype or adapters[0].dtype
    modules = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    tensors: dict[str, torch.Tensor] = {}
    f32 = torch.float32
    for mod in modules:
        present = [
            (t, a.modules[mod], w) for t, (a, w) in enumerate(zip(adapters, weights, strict=True)) if mod in a.modules
        ]
        ref = present[0][1]
        out_f, in_f = ref.B.shape[0], ref.A.shape[1]
        if method == "cat":
            A = torch.zeros(new_rank, in_f, dtype=f32)
            B = torch.zeros(out_f, new_rank, dtype=f32)
            As = torch.cat([m.A.to(f32) * w * m.scale for _, m, w in present])
            Bs = torch.cat([m.B.to(f32) for _, m, _ in present], dim=1)
            A[: As.shape[0]] = As
            B[:, : Bs.shape[1]] = Bs
        elif svd:
            deltas = [(m.B.to(f32) @ m.A.to(f32)) * m.scale for _, m, _ in present]
            base_method = "linear" if method == "svd" else method.removesuffix("_svd")
            masks = None
            if base_method.startswith("dare"):
                masks = [
                    mask_fn(d.shape, density, seed, mod, t, "delta")
                    for (t, _, _), d in zip(present, deltas, strict=True)
                ]
            delta = combine_tasks(
                base_method,
                deltas,
                torch.tensor([w for _, _, w in present]),
                density=density,
                majority_sign_method=majority_sign_method,
                masks=masks,
            )
            del deltas
            if not bool(torch.isfinite(delta).all()):
                raise AdapterError(f"module {mod}: the combined update has NaN/Inf values; cannot take its SVD")
            try:
                A, B = truncated_svd(
                    delta, new_rank, clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver
                )
            except torch.linalg.LinAlgError as e:
                raise AdapterError(f"module {mod}: SVD failed ({' '.join(str(e).split())})") from None
            del delta
        else:
            shapes = {tuple(m.A.shape) for _, m, _ in present}
            if len(shapes) != 1:
                raise AdapterError(f"module {mod}: adapters have different ranks here; use cat or svd")
            wA, wB = [], []
            for _, m, w in present:
                ws = w * m.scale
                wA.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                wB.append(math.sqrt(abs(ws)))
            parts = []
            for part, w_part in (("A", wA), ("B", wB)):
                ts = [(m.A if part == "A" else m.B).to(f32) for _, m, _ in present]
                masks = None
                if method.startswith("dare"):
                    masks = [
                        mask_fn(x.shape, density, seed, mod, t, part) for (t, _, _), x in zip(present, ts, strict=True)
                    ]
                parts.append(
                    combine_tasks(
                        method,
                        ts,
                        torch.tensor(w_part),
                        density=density,
                        majority_sign_method=majority_sign_method,
                        masks=masks,
                    )
                )
            A, B = parts
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = A.to(out_dtype).contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = B.to(out_dtype).contiguous()
    config = dict(adapters[0].config)
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_target_modules(adapters),
        alpha_pattern={},
        rank_pattern={},
        use_rslora=False,  # the source scales are folded into the factors: the merged scale must be exactly 1
    )
    return MergedAdapter(config, tensors)


def write_adapter(
    merged: MergedAdapter,
    out: str | Path,
    *,
    force: bool = False,
    info: dict | None = None,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors to a staging folder renamed into OUT
    (writer.OutputClaim: OUT may not be, lie in or contain one of `inputs`)."""
    from safetensors.torch import save_file

    with claim_output(out, force=force, inputs=inputs) as claim:
        tmp = claim.staging()
        save_file(merged.tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(merged.config, indent=2, sort_keys=True))
        if info is not None:
            (tmp / "blockmerge_lora.json").write_text(json.dumps(info, indent=2))
        return claim.commit(tmp)


# ------------------------------------------------------------------------------------- merge into base


def merge_into_base(
    base_dir: str | Path,
    adapter_paths: Sequence[str | Path],
    weights: Sequence[float] | None,
    out: str | Path,
    *,
    force: bool = False,
    shard_size: str = "5GB",
    dtype: torch.dtype | None = None,
    device: str | None = None,
    progress: bool = True,
    coefficients: torch.Tensor | None = None,
    extra_json: dict[str, dict] | None = None,
) -> Path:
    """Full checkpoint W0 + sum_t w_t s_t B_t A_t per adapted weight, streamed block by block; one
    module's delta is formed at a time (one matmul over the concatenated factors). `coefficients`
    [T, n_blocks] (base block order) gives a weight per adapter and block instead of `weights`."""
    from blockmerge.io.checkpoint import block_name
    from blockmerge.merge.run import stream_merge

    base = Checkpoint(base_dir)
    adapters, names = read_adapters(adapter_paths, base, base_given=True)
    T = len(adapters)
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    if len(weights) != T:
        raise AdapterError(f"--weights: expected {T} values (one per adapter), got {len(weights)}")
    if any(not math.isfinite(w) for w in weights):
        raise AdapterError(f"--weights: {weights} must be finite numbers")
    block_index = {b.name: i for i, b in enumerate(base.blocks())}
    if coefficients is not None:
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64).detach().cpu()
        if tuple(coefficients.shape) != (T, len(block_index)):
            raise AdapterError(
                f"coefficients: shape {list(coefficients.shape)}, expected [{T}, {len(block_index)}] "
                "(adapters x blocks)"
            )
        if not bool(torch.isfinite(coefficients).all()):
            raise AdapterError("coefficients: NaN or Inf values")
    by_tensor: dict[str, list[tuple[LoraModule, float]]] = {}
    for t, (a, w) in enumerate(zip(adapters, weights, strict=True)):
        for mod, m in a.modules.items():
            tname = names[mod]
            if coefficients is not None:
                w = float(coefficients[t, block_index[block_name(tname)]])
            by_tensor.setdefault(tname, []).append((m, w))

    def merge_tensor(name: str, w0: torch.Tensor, _experts: list[torch.Tensor]) -> torch.Tensor:
        terms = by_tensor.get(name)
        if not terms:
            return w0
        dev = w0.device
        A = torch.cat([m.A.to(dev, torch.float32) for m, _ in terms])
        B = torch.cat([m.B.to(dev, torch.float32) * (w * m.scale) for m, w in terms], dim=1)
        acc = w0.to(torch.float32, copy=True)
        if terms[0][0].fan_in_fan_out:
            acc.addmm_(A.T, B.T)
        else:
            acc.addmm_(B, A)
        return acc.to(w0.dtype if dtype is None else dtype)

    info = {
        "blockmerge_lora": {
            "base": str(base_dir),
            "adapters": [str(p) for p in adapter_paths],
            "weights": weights if coefficients is None else None,
            "scales": [sorted({m.scale for m in a.modules.values()}) for a in adapters],
        }
    }
    return stream_merge(
        base,
        [],
        out,
        merge_tensor,
        force=force,
        shard_size=shard_size,
        dtype=dtype,
        device=device,
        progress=progress,
        extra_json={"blockmerge_lora.json": info, **(extra_json or {})},
        desc="lora merge-into-base",
        inputs=adapter_paths,
    )


# ---------------------------------------------------------------------------------------------------- CLI


def finite_float(x: str) -> float:
    """argparse type: a finite number."""
    try:
        v = float(x)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{x!r} is not a finite number (OUT goes first, or after --out)")
    return v


def _out_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """OUT is never guessed: the first positional argument, or --out (a list option takes every value after it)."""
    p.add_argument("out", metavar="OUT", nargs="?", help=f"{what} (or --out OUT)")
    p.add_argument("--out", "-o", dest="out_opt", metavar="OUT", default=None, help=f"{what}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    h = "merge adapters into one adapter (PEFT add_weighted_adapter semantics)"
    m = sub.add_parser("merge", help=h, description=h)
    _out_arguments(m, "output adapter folder")
    m.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter folders (same base)")
    m.add_argument("--method", default="svd", choices=ADAPTER_METHODS, help="PEFT combination type (default svd)")
    m.add_argument("--weights", nargs="+", type=finite_float, default=None, help="one per adapter (default 1)")
    m.add_argument("--density", type=finite_float, default=None, help="ties/dare/magnitude_prune: fraction kept")
    m.add_argument("--rank", type=int, default=None, help="svd methods: output rank (default: largest input r)")
    m.add_argument("--svd-clamp", type=finite_float, default=None, help="PEFT's svd_clamp quantile")
    m.add_argument("--svd-full-matrices", action="store_true", help="full SVD as PEFT's default (same result)")
    m.add_argument("--svd-driver", default=None, help="torch.linalg.svd driver on CUDA (gesvd, gesvdj, gesvda)")
    m.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                   help="ties: elect signs by summed magnitude (total) or by count (frequency)")  # fmt: skip
    m.add_argument("--seed", type=int, default=0, help="DARE masks")
    m.add_argument("--base", default=None, help="base checkpoint: check the adapters' shapes against it")
    m.add_argument("--dtype", default=None, help="output dtype (default: the first adapter's)")
    m.add_argument("--force", action="store_true", help="overwrite OUT")

    h = "W0 + sum_t w_t s_t B_t A_t as a full checkpoint, streamed block by block"
    b = sub.add_parser("merge-into-base", help=h, description=h)
    _out_arguments(b, "output checkpoint folder")
    b.add_argument("--base", required=True, metavar="DIR", help="base checkpoint the adapters were trained on")
    b.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter folders")
    b.add_argument("--weights", nargs="+", type=finite_float, default=None, help="one per adapter (default 1)")
    b.add_argument("--dtype", default=None, help="output dtype (default: the base's)")
    b.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    b.add_argument("--device", default=None, help="where tensors are combined: cpu (default) or cuda")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or final line")
    b.add_argument("--force", action="store_true", help="overwrite OUT")

    h = "learn per-adapter coefficients by JS divergence to base + adapter t (DivMerge)"
    d = sub.add_parser("divmerge", help=h, description=h)
    d.add_argument("config", metavar="CONFIG", help="YAML: base_model, adapters: [{adapter: DIR, data: FILE}], ...")
    d.add_argument("out", metavar="OUT", help="output folder (a checkpoint, or an adapter with --output adapter)")
    d.add_argument("--steps", type=int, default=None, help="learning steps (overrides the config's steps/epochs)")
    d.add_argument("--device", default=None, help="cpu or cuda (overrides the config)")
    d.add_argument(
        "--output",
        choices=("base", "adapter"),
        default=None,
        help="write the merged full checkpoint (base, default) or a cat adapter with the coefficients",
    )
    d.add_argument("--force", action="store_true", help="overwrite OUT")
    d.add_argument("--no-progress", action="store_true", help="no progress bars or final line")
    d.add_argument("--memory", default=None, help="base blocks kept resident on the device, e.g. 8GiB (overrides "
                   "the config; default: half of the free memory); what does not fit is streamed")  # fmt: skip


def _resolve_out(args: argparse.Namespace) -> None:
    if args.out is not None and args.out_opt is not None and args.out != args.out_opt:
        raise ValueError(f"OUT given twice ({args.out} and --out {args.out_opt})")
    args.out = args.out or args.out_opt
    if args.out is None:
        raise ValueError(
            "OUT is missing: give it first (before --adapters) or as --out OUT; --adapters and --weights take "
            "every value that follows them"
        )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.lora_command in ("merge", "merge-into-base"):
        _resolve_out(args)
    if args.lora_command == "merge":
        inputs = [*args.adapters, *([args.base] if args.base else [])]
        with claim_output(args.out, force=args.force, inputs=inputs):
            return _merge_cli(args, inputs, started)
    if args.lora_command == "merge-into-base":
        from blockmerge.io.dtypes import parse_device

        parse_device(args.device)
        with claim_output(args.out, force=args.force, inputs=[args.base, *args.adapters]):
            merge_into_base(
                args.base,
                args.adapters,
                args.weights,
                args.out,
                force=args.force,
                shard_size=args.shard_size,
                dtype=parse_dtype(args.dtype, "--dtype"),
                device=args.device,
                progress=not args.no_progress,
            )
        return 0
    if args.lora_command == "divmerge":
        from blockmerge.lora.learn import run_divmerge_cli

        return run_divmerge_cli(args)
    raise ValueError(f"unknown lora subcommand {args.lora_command!r}")


def _merge_cli(args: argparse.Namespace, inputs: list[str], started: float) -> int:
    from blockmerge.io.report import final_line

    base = Checkpoint(args.base) if args.base else None
    adapters, _ = read_adapters(args.adapters, base, base_given=args.base is not None)
    merged = merge_adapters(
        adapters,
        args.weights,
        args.method,
        density=args.density,
        rank=args.rank,
        svd_clamp=args.svd_clamp,
        svd_full_matrices=args.svd_full_matrices,
        svd_driver=args.svd_driver,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
        dtype=parse_dtype(args.dtype, "--dtype"),
    )
    info = {
        "adapters": list(map(str, args.adapters)),
        "weights": args.weights,
        "method": args.method,
        "density": args.density,
        "rank": merged.config["r"],
        "seed": args.seed,
    }
    out = write_adapter(merged, args.out, force=args.force, info=info, inputs=inputs)
    print(final_line(f"merged {len(adapters)} adapters ({args.method}, r={merged.config['r']}) into {out}", started))
    return 0
