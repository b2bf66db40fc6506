"""The PEFT LoRA adapter format: read an adapter folder (adapter_config.json + adapter_model.safetensors) into
its modules, check that adapters share a base, and write an adapter through the output-commit protocol.

An adapter module m adds s * B A to the base weight W0 (A: [r, in], B: [out, r]; s = alpha/r, or alpha/sqrt(r)
with rslora; the product is transposed when fan_in_fan_out). PEFT names the factors
base_model.model.<module>.lora_A.weight and .lora_B.weight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, check_finite
from blockmerge.io.commit import claim_output

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


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


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
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
    if config.get("target_parameters"):  # PEFT's ParamWrapper: LoRA on parameters, e.g. fused MoE experts
        raise AdapterError(
            f"{cfg_file}: target_parameters {sorted(config['target_parameters'])} is not supported "
            "(LoRA on parameters such as fused MoE experts or routers; adapters on Linear modules only)"
        )
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    tensors = load_tensors(path)
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
        r = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
        if A.shape[0] != r:
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: module {module} has rank {A.shape[0]} but {CONFIG_NAME} says r={r}"
            )
        alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
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


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class MergedAdapter:
    """An adapter to write: its adapter_config.json and its PEFT-named factors."""

    config: dict
    tensors: dict[str, torch.Tensor]  # PEFT names: base_model.model.<module>.lora_A.weight


def target_modules(adapters: Sequence[Adapter]) -> str | list[str]:
    """The target_modules of an adapter that covers all of `adapters`: the union of their lists, or the
    alternation of their regex strings."""
    tms = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in tms):
        return "|".join(f"({t})" for t in tms)
    out: set[str] = set()
    for t in tms:
        out |= set(t or [])
    return sorted(out)


def write_adapter(
    merged: MergedAdapter,
    out: str | Path,
    *,
    force: bool = False,
    info: dict | None = None,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors to a staging folder renamed into OUT
    (io.commit.claim_output: OUT may not be, lie in or contain one of `inputs`)."""
    from safetensors.torch import save_file

    with claim_output(out, force=force, inputs=inputs) as claim:
        tmp = claim.staging()
        save_file(merged.tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(merged.config, indent=2, sort_keys=True))
        if info is not None:
            (tmp / "blockmerge_lora.json").write_text(json.dumps(info, indent=2))
        return claim.commit(tmp)
