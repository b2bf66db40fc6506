"""The merge methods, one entry each: name, per-model and global parameters (defaults, allowed ranges), how the
base model is used, how many models it merges, and the tensor function. Config validation, planning and the
`blockmerge merge --help` text are derived from this table, so a new method is one entry here and one tensor
function (methods.py).

Parameter names, defaults and meaning follow mergekit's YAML (mergekit/merge_methods/*). A tensor function
gets one TensorCall per floating-point tensor: the base's tensor (None when the method merges the models
without a base), the models' tensors, each model's parameters and the global parameters, all resolved for
that tensor (gradients and filters evaluated, types and ranges checked), and the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from blockmerge.merge import methods, sparse, spherical
from blockmerge.merge.call import TensorCall

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Param:
    """One parameter: `kind` number | bool | int; numbers may have a range [low, high] (low excluded when
    low_open); bools may be limited to `allowed` values; `extrapolate`: --extrapolate lifts the range."""

    name: str
    default: Any = REQUIRED
    help: str = ""
    kind: Literal["number", "bool", "int"] = "number"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allowed: tuple | None = None
    extrapolate: bool = False

    def describe(self) -> str:
        d = " (required)" if self.default is REQUIRED else f"={_yaml(self.default)}"
        rng = ""
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" <= {self.high:g}"
            rng = f" [{lo}{self.name}{hi}]"
        if self.allowed is not None:
            rng = f" [{'/'.join(_yaml(v) for v in self.allowed)} only]"
        return f"{self.name}{d}{rng}"

    def check(self, v: Any, where: str, tensor: str, method: str, extrapolate: bool = False) -> Any:
        """v converted to the parameter's kind and checked against its range; ValueError naming `where`."""
        if self.kind == "bool":
            if not isinstance(v, (bool, int)):
                raise ValueError(f"{where}: expected true/false, got {v!r}")
            v = bool(v)
        elif self.kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{where}: expected an integer, got {v!r}")
        else:
            v = _number(v, where, tensor)
        if self.allowed is not None and v not in self.allowed:
            raise ValueError(f"{where}: {self.name}={_yaml(v)} is not supported for {method}")
        if extrapolate and self.extrapolate:
            return v
        below = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        if below or (self.high is not None and v > self.high):
            lo = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" <= {self.high:g}"
            more = " (--extrapolate to go beyond)" if self.extrapolate else ""
            raise ValueError(f"{where}: {v} for tensor {tensor}, expected {lo}{self.name}{hi}{more}")
        return v


def _number(v: Any, where: str, tensor: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number for tensor {tensor}, got {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: {v} for tensor {tensor}, expected a finite number")
    return float(v)


def _yaml(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Method:
    """A merge method. base: `required` (models are merged relative to base_model), `optional` (relative to
    base_model when given, else the models alone), `template` (every model is merged; base_model, when
    listed, only chooses the config and tokenizer copied). models_min/max count the merged models besides
    the base."""

    name: str
    summary: str
    merge: Callable[[TensorCall], torch.Tensor]
    tensor_params: tuple[Param, ...] = ()
    global_params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "template"] = "required"
    models_min: int = 1
    models_max: int | None = None
    random: bool = field(default=False)  # output depends on `seed`
    # checks across parameters, given one tensor's resolved (per-model list, global dict): ValueError
    check: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None


WEIGHT = Param("weight", help="the model's coefficient")
WEIGHT_1 = Param("weight", 1.0, help="the model's coefficient")
DENSITY = Param("density", 1.0, "fraction of the task vector kept", low=0.0, high=1.0, low_open=True)
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector")
SEED = Param("seed", 0, "random seed, mixed with the tensor name", kind="int")
INT8_MASK = Param("int8_mask", False, "accepted for compatibility (mergekit's memory option); no effect", kind="bool")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, "divide by the sum of the weights", kind="bool")


def _rescale(default: bool, allowed: tuple | None = None) -> Param:
    help_ = "scale the kept values up (DARE: / density; DELLA, breadcrumbs: to ||tau||_1)"
    return Param("rescale", default, help_, kind="bool", allowed=allowed)


def _gta(name: str, summary: str, fn, params: tuple[Param, ...], normalize: bool, rescale: bool, **kw) -> Method:
    """A task-vector method with mergekit's generalized task arithmetic parameters (weight first)."""
    allowed = kw.pop("rescale_allowed", None)
    glob = (INT8_MASK, LAMBDA, SEED, _normalize(normalize), _rescale(rescale, allowed))
    return Method(name, summary, fn, (WEIGHT, *params), glob, **kw)


_DENSITY_ONLY = Param("density", 1.0, "accepted; no sparsification")
_T = Param("t", help="interpolation factor", low=0.0, high=1.0, extrapolate=True)
_GAMMA = Param("gamma", 0.01, "fraction of the largest |tau| dropped", low=0.0, high=1.0)
_RAM_EPS = Param("epsilon", 1e-5, "|tau| above which an entry counts as changed", low=0.0)
_EPSILON = Param("epsilon", 0.15, "keep probabilities span density +/- epsilon by magnitude rank", low=0.0)

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", "weighted average of the models", methods.linear_merge, (WEIGHT,), (_normalize(True),),
               base="template"),
        _gta("task_arithmetic", "base + lambda * sum of weighted task vectors", methods.task_arithmetic,
             (_DENSITY_ONLY,), normalize=False, rescale=False),
        _gta("ties", "top-density magnitudes per task vector, sign election, disjoint mean", methods.ties,
             (DENSITY,), normalize=True, rescale=False, rescale_allowed=(False,)),
        _gta("dare_ties", "random drop (keep prob. density), rescale, sign election", methods.dare_ties,
             (DENSITY,), normalize=False, rescale=True, random=True),
        _gta("dare_linear", "random drop (keep prob. density), rescale, weighted sum", methods.dare_linear,
             (DENSITY,), normalize=False, rescale=True, random=True),
        _gta("breadcrumbs", "drop the largest (gamma) and smallest |tau|, keep density, weighted sum",
             sparse.breadcrumbs, (DENSITY, _GAMMA), normalize=False, rescale=False),
        _gta("breadcrumbs_ties", "breadcrumbs' drop, then sign election", sparse.breadcrumbs_ties,
             (DENSITY, _GAMMA), normalize=False, rescale=False),
        _gta("della", "drop with keep prob. by magnitude rank (DELLA), rescale, sign election", sparse.della,
             (DENSITY, _EPSILON), normalize=True, rescale=True, random=True, check=sparse.check_della),
        _gta("della_linear", "DELLA's drop and rescale, weighted sum", sparse.della_linear,
             (DENSITY, _EPSILON), normalize=False, rescale=True, random=True, check=sparse.check_della),
        Method("sce", "variance top-k positions, mean-square weights, sign election (SCE)", sparse.sce, (),
               (INT8_MASK, Param("select_topk", 1.0, "fraction of positions kept", low=0.0, high=1.0))),
        Method("ram", "mean of the task vectors over the models that change each entry (> epsilon)", sparse.ram,
               (), (_RAM_EPS,)),
        Method("ramplus_tl", "ram, with the entries only one model changes scaled up by its overlap ratio",
               sparse.ramplus_tl, (), (Param("r", 0.1, low=0.0), Param("alpha", 0.2, low=0.0), _RAM_EPS)),
        Method("slerp", "spherical interpolation from base_model (t=0) to the other model (t=1)",
               methods.slerp_merge, (), (_T,), models_max=1),
        Method("model_stock", "base + t * mean task vector, t from the task vectors' angles (Model Stock)",
               methods.model_stock, (), (Param("filter_wise", False, "one t per row", kind="bool"),), models_min=2),
        Method("nearswap", "base moved towards the other model where they are within t of each other",
               methods.nearswap, (), (Param("t", help="closeness scale", low=0.0),), models_max=1),
        Method("arcee_fusion", "the other model's entries whose importance (|delta| * row KL) is an outlier",
               methods.arcee_fusion, models_max=1),
        Method("passthrough", "one model (or with slices: layer ranges of models stacked), times scale",
               methods.passthrough, (Param("scale", 1.0, "multiplies the tensor"),), base="template", models_max=1),
        Method("multislerp", "spherical weighted mean of the models (or task vectors with a base)",
               spherical.multislerp, (WEIGHT,), (Param("normalize_weights", True, kind="bool"),
               Param("eps", 1e-8, "numerical floor", low=0.0)), base="optional", models_min=2),
        Method("nuslerp", "slerp of two models (or task vectors with a base) at t = w1 / (w0 + w1)",
               spherical.nuslerp, (WEIGHT,), (Param("nuslerp_flatten", True, "whole tensor", kind="bool"),
               Param("nuslerp_row_wise", False, "per row, not per column", kind="bool")), base="optional",
               models_min=2, models_max=2),
        Method("karcher", "Riemannian (Karcher) mean of the models on the sphere, times their mean norm",
               spherical.karcher, (), (Param("max_iter", 10, kind="int", low=0), Param("tol", 1e-5, low=0.0)),
               base="template", models_min=2),
    )
}  # fmt: skip


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (expected one of {', '.join(REGISTRY)})") from None


def methods_help() -> str:
    """The method table of `blockmerge merge --help`."""
    lines = ["merge methods (mergekit's YAML; per model: models[].parameters; global: parameters):"]
    for m in REGISTRY.values():
        base = {"required": "needs base_model", "optional": "base_model optional", "template": "no base"}[m.base]
        n = f"{m.models_min}" + ("+" if m.models_max is None else f"-{m.models_max}" * (m.models_max != m.models_min))
        seeded = "; random, from seed" if m.random else ""
        lines.append(f"  {m.name:<17}{m.summary} ({base}; {n} model{'s' * (n != '1')}{seeded})")
        if m.tensor_params:
            lines.append(f"  {'':<17}per model: {', '.join(p.describe() for p in m.tensor_params)}")
        if m.global_params:
            lines.append(f"  {'':<17}global: {', '.join(p.describe() for p in m.global_params)}")
    return "\n".join(lines)
