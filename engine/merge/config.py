"""mergekit-style merge configurations: YAML -> pydantic models, and per-tensor parameter resolution.

Supported (mergekit 0.1.x meaning): merge_method (any method of registry.REGISTRY); base_model;
models: [{model: DIR, parameters: {...}}]; parameters: {...} (defaults for every model plus the method's
global parameters); dtype / out_dtype (output dtype); tokenizer_source: base | union | <model folder>
(experts with other vocabularies: vocab.py).
`slices`: with merge_method passthrough, layer ranges of any models stacked into a new model (slices.py);
with the other methods only the trivial form that is equivalent to `models:` (one slice whose sources all
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
from pathlib import Path
from typing import Annotated, Any

import yaml
from blockmerge.io.checkpoint import block_name
from blockmerge.io.dtypes import DTYPES
from blockmerge.merge.registry import REGISTRY, REQUIRED, Method, Param, get_method
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator


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
    merge_method: str
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

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in REGISTRY:
            names = [repr(n) for n in REGISTRY]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {v!r} (expected one of {', '.join(sorted(DTYPES))})")
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
    # parameters of each merged model as written (model-level dicts): the experts, or with has_base False
    # every model (the template first)
    expert_params: list[dict[str, Any]]
    has_base: bool = True  # False: `base` is only the template and is merged like the other models
    out_dtype: str | None
    layer_range: tuple[int, int] | None = None  # from a `slices:` config: must cover every layer


def resolve_path(ref: str, cfg: MergeConfig, field: str) -> Path:
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


def _check_parameter_names(cfg: MergeConfig, models: list[ModelEntry], m: Method) -> None:
    per_model = {p.name for p in m.tensor_params}
    for i, entry in enumerate(models):
        for k in entry.parameters:
            if k not in per_model:
                allowed = ", ".join(sorted(per_model)) or "none"
                raise ConfigError(f"models.{i}.parameters.{k}: unknown parameter for {m.name} (per model: {allowed})")
    allowed_global = per_model | {p.name for p in m.global_params}
    for k in cfg.parameters:
        if k not in allowed_global:
            raise ConfigError(
                f"parameters.{k}: unknown parameter for {m.name} (allowed: {', '.join(sorted(allowed_global))})"
            )


def _check_count(m: Method, n: int, has_base: bool) -> None:
    others = " besides base_model" if has_base else ""
    if m.models_max == m.models_min == 1 and n != 1 and has_base:
        raise ConfigError(f"models: {m.name} merges base_model with exactly one other model, got {n} others")
    if n < m.models_min:
        need = "at least one model" if m.models_min == 1 else f"at least {m.models_min} models"
        raise ConfigError(f"models: {m.name} needs {need}{others}, got {n}")
    if m.models_max is not None and n > m.models_max:
        most = f"{m.models_max} model{'s' * (m.models_max != 1)}"
        raise ConfigError(f"models: {m.name} merges at most {most}{others}, got {n}")


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
    m = get_method(cfg.merge_method)
    paths = [resolve_path(e.model, cfg, f"models.{i}.model") for i, e in enumerate(models)]
    base = resolve_path(cfg.base_model, cfg, "base_model") if cfg.base_model else None
    _check_parameter_names(cfg, models, m)
    if m.base == "required" and base is None:
        raise ConfigError(f"base_model: required for {m.name}")
    if m.base == "template" or base is None:
        # every model is merged; base_model (if listed) only decides the config/tokenizer template
        keep = list(range(len(models)))
        if base is not None and base in paths:
            j = paths.index(base)
            keep = [j] + [i for i in keep if i != j]
        _check_count(m, len(keep), has_base=False)
        template, experts, has_base = paths[keep[0]], [paths[i] for i in keep[1:]], False
    else:
        keep = [i for i, p in enumerate(paths) if p != base]
        _check_count(m, len(keep), has_base=True)
        template, experts, has_base = base, [paths[i] for i in keep], True
    plan = ResolvedPlan(
        method=m.name,
        base=template,
        experts=experts,
        expert_params=[models[i].parameters for i in keep],
        has_base=has_base,
        out_dtype=cfg.out_dtype or cfg.dtype,
        layer_range=layer_range,
    )
    return plan, [models[i] for i in keep]


class ParameterResolver:
    """Per-tensor parameter values for a plan: model-level value, else top-level value, else the default;
    each converted and range-checked by its registry.Param."""

    def __init__(self, cfg: MergeConfig, plan: ResolvedPlan, num_layers: int, *, extrapolate: bool = False):
        self.cfg, self.plan, self.num_layers, self.extrapolate = cfg, plan, num_layers, extrapolate
        self.method = get_method(plan.method)

    def _value(self, p: Param, model_params: dict | None, tensor: str, t: float, where: str) -> Any:
        v = None
        if model_params is not None and p.name in model_params:
            v = evaluate_setting(model_params[p.name], tensor, t)
        if v is None and p.name in self.cfg.parameters:
            v = evaluate_setting(self.cfg.parameters[p.name], tensor, t)
        if v is None:
            if p.default is REQUIRED:
                raise ConfigError(f"{where}: parameter {p.name!r} is required for {self.method.name} (tensor {tensor})")
            return p.default
        field = f"{where}.parameters.{p.name}" if model_params is not None else f"parameters.{p.name}"
        try:
            return p.check(v, field, tensor, self.method.name, self.extrapolate)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def tensor_params(self, tensor: str) -> list[dict[str, Any]]:
        """One dict per merged model (ResolvedPlan.expert_params order)."""
        t = layer_t(tensor, self.num_layers)
        return [
            {p.name: self._value(p, mp, tensor, t, f"models.{i}") for p in self.method.tensor_params}
            for i, mp in enumerate(self.plan.expert_params)
        ]

    def global_params(self, tensor: str) -> dict[str, Any]:
        t = layer_t(tensor, self.num_layers)
        return {p.name: self._value(p, None, tensor, t, "parameters") for p in self.method.global_params}
