"""mergekit-style merge configurations: YAML -> pydantic models, and per-tensor parameter resolution.

Supported (mergekit 0.1.x meaning): merge_method linear | task_arithmetic | ties | dare_ties | dare_linear |
slerp; base_model; models: [{model: DIR, parameters: {...}}]; parameters: {...} (defaults for every model
plus the method's global parameters); dtype / out_dtype (output dtype); tokenizer_source: base.
`slices` is accepted only in the trivial form that is equivalent to `models:` (one slice whose sources all
cover every layer); anything else is a clear "not supported" error.

Parameter values, as mergekit evaluates them (mergekit/config.py `evaluate_setting`):
  - a scalar;
  - a list of numbers: a gradient over the layers, linearly interpolated at t = layer / (num_layers - 1);
    the embedding block takes t = 0 (first value) and the head block (final norm, lm_head) t = 1 (last
    value), as mergekit plans pre-/post-layer weights; a model with one layer uses t = 0;
  - a list of non-numbers (bools/strings): a step over the layers, `value[int(t * (len - 1))]`;
  - a list of {filter: PATTERN, value: V} entries: the first entry whose filter matches the tensor name
    (fnmatch `*PATTERN*`, i.e. a substring with glob characters) wins; an entry without filter matches all.
Model paths are local folders: absolute, relative to the working directory, or relative to the YAML's folder.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from blockmerge.io.checkpoint import block_name
from blockmerge.io.dtypes import DTYPES
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")

# Per-model ("tensor") parameters and global parameters of every method, with defaults; REQUIRED = no default.
REQUIRED = object()
_GTA_GLOBAL = {"int8_mask": False, "lambda": 1.0, "seed": 0}
METHOD_PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"weight": REQUIRED}, {"normalize": True}),
    "task_arithmetic": (
        {"weight": REQUIRED, "density": 1.0},
        {**_GTA_GLOBAL, "normalize": False, "rescale": False},
    ),
    "ties": ({"weight": REQUIRED, "density": 1.0}, {**_GTA_GLOBAL, "normalize": True, "rescale": False}),
    "dare_ties": ({"weight": REQUIRED, "density": 1.0}, {**_GTA_GLOBAL, "normalize": False, "rescale": True}),
    "dare_linear": ({"weight": REQUIRED, "density": 1.0}, {**_GTA_GLOBAL, "normalize": False, "rescale": True}),
    "slerp": ({}, {"t": REQUIRED}),
}


class ConfigError(ValueError):
    """A merge configuration is invalid; the message names the file and field."""


def _check_value(v: Any, where: str) -> None:
    """Parameter values: scalar, list of scalars, or list of {filter, value} conditions (recursively)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{where}: empty list")
        if all(isinstance(e, (bool, int, float, str)) for e in v):
            return
        for i, e in enumerate(v):
            if not isinstance(e, dict):
                raise ValueError(f"{where}[{i}]: expected a number or a {{filter, value}} entry, got {e!r}")
            extra = set(e) - {"filter", "value"}
            if extra:
                raise ValueError(f"{where}[{i}]: unknown key {sorted(extra)[0]!r} (expected filter, value)")
            if "value" not in e:
                raise ValueError(f"{where}[{i}]: missing 'value'")
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise ValueError(f"{where}[{i}].filter: expected a string")
            _check_value(e["value"], f"{where}[{i}].value")
        return
    raise ValueError(f"{where}: unsupported value {v!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_parameters(v: dict[str, Any]) -> dict[str, Any]:
    for k, x in v.items():
        _check_value(x, k)
    return v


Parameters = Annotated[dict[str, Any], AfterValidator(_check_parameters)]


class ModelEntry(_Strict):
    model: str
    parameters: Parameters = {}


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}


class SliceDef(_Strict):
    sources: list[SliceSource]
    parameters: dict[str, Any] = {}


class MergeConfig(_Strict):
    merge_method: Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"]
    base_model: str | None = None
    models: list[ModelEntry] = []
    slices: list[SliceDef] | None = None
    parameters: Parameters = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None
    # folder relative model paths are also looked up in (the YAML's folder); not part of the YAML
    source_dir: str | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {v!r} (expected one of {', '.join(sorted(DTYPES))})")
        return v

    @field_validator("tokenizer_source")
    @classmethod
    def _tok(cls, v: str | None) -> str | None:
        if v not in (None, "base"):
            raise ValueError(f"{v!r} not supported: only 'base' (the tokenizer files of the base model are copied)")
        return v


def _format_validation(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return f"{where}: invalid merge config: " + "; ".join(parts)


def load_config(src: str | Path | dict | MergeConfig) -> MergeConfig:
    """A MergeConfig from a YAML file path, YAML text, a dict, or a MergeConfig."""
    if isinstance(src, MergeConfig):
        return src
    where = "config"
    source_dir = None
    if isinstance(src, (str, Path)):
        p = Path(src)
        one_line = "\n" not in str(src) and len(str(src)) < 4096
        if isinstance(src, Path) or (one_line and (p.suffix in (".yml", ".yaml") or p.is_file())):
            if not p.is_file():
                raise ConfigError(f"{p}: config file not found")
            where, source_dir, text = str(p), str(p.resolve().parent), p.read_text()
        else:
            text = str(src)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        data = src
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with merge_method, models, ... at the top level")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where)) from None
    if cfg.source_dir is None and source_dir is not None:
        cfg = cfg.model_copy(update={"source_dir": source_dir})
    return cfg


def evaluate_setting(value: Any, tensor: str, t: float) -> Any:
    """mergekit's evaluate_setting: scalar, gradient list, or first matching {filter, value} entry."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in value):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in value):
        return value[int(t * (len(value) - 1))]
    for cond in value:
        flt = cond.get("filter")
        if not flt or fnmatch.fnmatch(tensor, f"*{flt}*"):
            return evaluate_setting(cond["value"], tensor, t)
    return None


def layer_t(tensor: str, num_layers: int) -> float:
    """Position of a tensor along the model for gradients: 0 for embeddings, 1 for the head."""
    b = block_name(tensor)
    if b == "embed":
        return 0.0
    if b == "head":
        return 1.0
    i = int(b.split(".")[1])
    return i / (num_layers - 1) if num_layers > 1 else 0.0


class ResolvedPlan(BaseModel):
    """Which folders are read and in which role."""

    method: str
    base: Path  # template: config/tokenizer copied from it; the first input of every merge_tensor call
    experts: list[Path]
    # parameters of each expert as written (model-level dicts), in expert order
    expert_params: list[dict[str, Any]]
    out_dtype: str | None
    layer_range: tuple[int, int] | None = None  # from a `slices:` config: must cover every layer


def _resolve_path(ref: str, cfg: MergeConfig, field: str) -> Path:
    p = Path(ref).expanduser()
    cands = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(cfg.source_dir) / p] if cfg.source_dir else [])
    for c in cands:
        if c.is_dir():
            return c.resolve()
    raise ConfigError(
        f"{field}: model {ref!r} is not a local folder (only local Hugging Face checkpoint folders are supported)"
    )


def _models_from_slices(cfg: MergeConfig) -> tuple[list[ModelEntry], tuple[int, int]]:
    if len(cfg.slices) != 1:
        raise ConfigError(
            "slices: not supported (only a single slice whose sources all cover every layer, which is the same "
            "as `models:`); use `models:`"
        )
    sl = cfg.slices[0]
    ranges = {tuple(s.layer_range) for s in sl.sources}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise ConfigError("slices: not supported (sources with different or partial layer_range); use `models:`")
    out = []
    for s in sl.sources:
        params = {**sl.parameters, **s.parameters}
        for k, x in params.items():
            try:
                _check_value(x, k)
            except ValueError as e:
                raise ConfigError(f"slices.0.sources: {e}") from None
        out.append(ModelEntry(model=s.model, parameters=params))
    return out, next(iter(ranges))


def resolve_plan(cfg: MergeConfig) -> tuple[ResolvedPlan, list[ModelEntry]]:
    """Check the method's structural rules and find every folder; no tensor is read here."""
    models = list(cfg.models)
    layer_range = None
    if cfg.slices is not None:
        if models:
            raise ConfigError("config: give either models or slices, not both")
        models, layer_range = _models_from_slices(cfg)
    if not models:
        raise ConfigError("models: at least one model is required")
    method = cfg.merge_method
    paths = [_resolve_path(m.model, cfg, f"models.{i}.model") for i, m in enumerate(models)]
    base = _resolve_path(cfg.base_model, cfg, "base_model") if cfg.base_model else None
    out_dtype = cfg.out_dtype or cfg.dtype
    tensor_names = set(METHOD_PARAMS[method][0])
    for i, m in enumerate(models):
        for k in m.parameters:
            if k not in tensor_names:
                allowed = ", ".join(sorted(tensor_names)) or "none"
                raise ConfigError(f"models.{i}.parameters.{k}: unknown parameter for {method} (per model: {allowed})")
    allowed_global = set(METHOD_PARAMS[method][0]) | set(METHOD_PARAMS[method][1])
    for k in cfg.parameters:
        if k not in allowed_global:
            raise ConfigError(
                f"parameters.{k}: unknown parameter for {method} (allowed: {', '.join(sorted(allowed_global))})"
            )
    if method == "linear":
        # linear averages the listed models; base_model (if listed) only decides the config/tokenizer template
        order = list(range(len(models)))
        if base is not None and base in paths:
            j = paths.index(base)
            order = [j] + [i for i in order if i != j]
        plan = ResolvedPlan(
            method=method,
            base=paths[order[0]],
            experts=[paths[i] for i in order[1:]],
            expert_params=[models[i].parameters for i in order],  # includes the template model first
            out_dtype=out_dtype,
            layer_range=layer_range,
        )
        return plan, [models[i] for i in order]
    if base is None:
        raise ConfigError(f"base_model: required for {method}")
    keep = [i for i, p in enumerate(paths) if p != base]
    if method == "slerp" and len(keep) != 1:
        raise ConfigError(f"models: slerp merges base_model with exactly one other model, got {len(keep)} others")
    if not keep:
        raise ConfigError(f"models: {method} needs at least one model besides base_model")
    plan = ResolvedPlan(
        method=method,
        base=base,
        experts=[paths[i] for i in keep],
        expert_params=[models[i].parameters for i in keep],
        out_dtype=out_dtype,
        layer_range=layer_range,
    )
    return plan, [models[i] for i in keep]


class ParameterResolver:
    """Per-tensor parameter values for a plan: model-level value, else top-level value, else the default."""

    def __init__(self, cfg: MergeConfig, plan: ResolvedPlan, num_layers: int):
        self.cfg, self.plan, self.num_layers = cfg, plan, num_layers
        self.tensor_defs, self.global_defs = METHOD_PARAMS[plan.method]

    def _value(self, key: str, model_params: dict | None, tensor: str, t: float, default: Any, where: str) -> Any:
        if model_params is not None and key in model_params:
            v = evaluate_setting(model_params[key], tensor, t)
            if v is not None:
                return v
        if key in self.cfg.parameters:
            v = evaluate_setting(self.cfg.parameters[key], tensor, t)
            if v is not None:
                return v
        if default is REQUIRED:
            raise ConfigError(f"{where}: parameter {key!r} is required for {self.plan.method} (tensor {tensor})")
        return default

    def tensor_params(self, tensor: str) -> list[dict[str, Any]]:
        """One dict per input (linear: every model; other methods: every non-base model)."""
        t = layer_t(tensor, self.num_layers)
        out = []
        for i, mp in enumerate(self.plan.expert_params):
            d = {}
            for key, default in self.tensor_defs.items():
                v = self._value(key, mp, tensor, t, default, f"models.{i}")
                d[key] = _number(v, f"models.{i}.parameters.{key}", tensor)
            out.append(d)
        return out

    def global_params(self, tensor: str) -> dict[str, Any]:
        t = layer_t(tensor, self.num_layers)
        d = {}
        for key, default in self.global_defs.items():
            v = self._value(key, None, tensor, t, default, "parameters")
            if key in ("normalize", "rescale", "int8_mask"):
                if not isinstance(v, (bool, int)):
                    raise ConfigError(f"parameters.{key}: expected true/false, got {v!r}")
                v = bool(v)
            elif key == "seed":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"parameters.seed: expected an integer, got {v!r}")
            else:
                v = _number(v, f"parameters.{key}", tensor)
            d[key] = v
        return d


def _number(v: Any, where: str, tensor: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: expected a number for tensor {tensor}, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {v} for tensor {tensor}, expected a finite number")
    return float(v)
