"""Extract a LoRA adapter from a fine-tune: per linear module of the decoder layers, the best rank-r
approximation of the task vector D = W_model - W_base (truncated SVD, D ~ B A with B = U_r S_r, A = V_r^T),
written as a PEFT adapter with lora_alpha = r (scale 1) that PeftModel.from_pretrained loads onto the base.

The linear modules are found on the model built on the meta device (transformers' own classes: nn.Linear,
and GPT-2's Conv1D, stored transposed, as fan_in_fan_out). Embeddings, norms, biases and the head are not
in the adapter; the report lists those that differ between the two checkpoints. Two blocks (the base's and
the model's) are read at a time, with the next one prefetched; only the factors are kept.

The relative error of a module is ||D - B A||_F / ||D||_F of the factors as written (0 when D = 0); up to
their rounding it is sqrt(sum_{i>r} s_i^2 / sum_i s_i^2) over the singular values s_i of D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Block, Checkpoint, block_name
from blockmerge.io.stream import stream_blocks
from blockmerge.lora.adapter import PREFIX, MergedAdapter, base_tensor_name, natural_key
from blockmerge.lora.merge import truncated_svd


@dataclass
class ModuleError:
    """How well one module's task vector is approximated."""

    module: str
    shape: tuple[int, int]  # of the base weight
    relative_change: float  # ||W_model - W_base||_F / ||W_base||_F: how much the fine-tune changed it
    relative_error: float  # ||D - B A||_F / ||D||_F


@dataclass
class Extraction:
    adapter: MergedAdapter
    modules: list[ModuleError]
    not_in_adapter: dict[str, float | str]  # tensors that differ but are not adapted: relative change or why


def linear_modules(base: Checkpoint) -> dict[str, tuple[str, bool]]:
    """{module: (base tensor name, fan_in_fan_out)} of the linear modules inside the decoder layers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if not (base.path / "config.json").exists():
        raise ValueError(f"{base.path}: no config.json (needed to find the linear modules)")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base.path))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{base.path}/config.json: not a causal LM transformers can build ({e})") from None
    found = {}
    for name, mod in skeleton.named_modules():
        if not isinstance(mod, (torch.nn.Linear, Conv1D)):
            continue
        if block_name(f"{name}.weight").startswith("layers."):  # raises, naming it, when the base lacks it
            found[name] = (base_tensor_name(name, base), isinstance(mod, Conv1D))
    if not found:
        raise ValueError(f"{base.path}: no linear module inside the decoder layers")
    return found


def select_modules(modules: dict[str, tuple[str, bool]], targets: Sequence[str] | None) -> dict[str, tuple[str, bool]]:
    """The modules named by `targets` with PEFT's list rule (the full name, or its ending after a dot)."""
    if not targets:
        return modules
    chosen = {}
    for t in targets:
        hits = {m: v for m, v in modules.items() if m == t or m.endswith("." + t)}
        if not hits:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise ValueError(
                f"--target-modules {t}: no linear module of the decoder layers is named so (they are "
                f"{', '.join(leaves)})"
            )
        chosen.update(hits)
    return {m: modules[m] for m in modules if m in chosen}


def check_model(base: Checkpoint, model: Checkpoint, tensors: Sequence[str]) -> None:
    for name in tensors:
        info = model.tensors.get(name)
        if info is None:
            raise ValueError(f"{model.path}: tensor {name} of base {base.path} is missing")
        if info.shape != base.tensors[name].shape:
            raise ValueError(
                f"{model.path}: tensor {name} has shape {list(info.shape)}, base has {list(base.tensors[name].shape)}"
            )


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.float()))  # fp32 (no copy of a large fp32 tensor): ~1e-7 relative


def relative_change(w0: torch.Tensor, w: torch.Tensor, rows: int = 4096) -> float:
    """||w - w0||_F / ||w0||_F: how much the fine-tune changed a tensor (in fp32 chunks of rows, so that an
    embedding matrix is never copied whole)."""
    diff = base = 0.0
    for a, b in zip(w0.split(rows), w.split(rows), strict=True):
        diff += _norm(b.float() - a.float()) ** 2
        base += _norm(a) ** 2
    return (diff / max(base, 1e-60)) ** 0.5


def extract_module(
    base_w: torch.Tensor,
    model_w: torch.Tensor,
    rank: int,
    *,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
    driver: str | None = None,
    module: str = "",
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, relative error, relative change) of one module: B @ A is the best rank-`rank` approximation of
    the delta; the error is measured on the factors as written (in `dtype`), so it includes their rounding."""
    delta = model_w.to(torch.float32) - base_w.to(torch.float32)
    norm = _norm(delta)
    change = norm / max(_norm(base_w), 1e-30)
    if fan_in_fan_out:
        delta = delta.T  # PEFT's factors are [r, in] and [out, r] for Conv1D too
    try:
        A, B = truncated_svd(delta, rank, driver=driver)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"module {module}: SVD failed ({' '.join(str(e).split())})") from None
    A, B = A.to(dtype), B.to(dtype)
    residual = delta.addmm_(B.to(torch.float32), A.to(torch.float32), alpha=-1)
    return A, B, _norm(residual) / norm if norm > 0 else 0.0, change


def extract_adapter(
    base_dir: str | Path,
    model_dir: str | Path,
    rank: int,
    *,
    target_modules: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    svd_driver: str | None = None,
    progress: bool = True,
) -> Extraction:
    """The rank-`rank` PEFT adapter approximating model - base, and the error of every module."""
    from blockmerge.io.report import progress as bar

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be an integer >= 1, got {rank!r}")
    base, model = Checkpoint(base_dir), Checkpoint(model_dir)
    modules = select_modules(linear_modules(base), target_modules)
    check_model(base, model, [t for t, _ in modules.values()])
    by_tensor = {t: (m, fan) for m, (t, fan) in modules.items()}
    factors, errors = {}, []
    out_dtype = dtype or model.tensors[next(iter(by_tensor))].dtype
    others = {t: "missing in the model" for t in base.tensors if t not in model.tensors}
    others.update({t: "not in the base" for t in model.tensors if t not in base.tensors})
    # the tensors both hold, block by block (the adapted ones are known to be there)
    blocks = [Block(b.name, tuple(t for t in b.tensors if t in model.tensors)) for b in base.blocks()]
    with bar(len(blocks), "lora extract", disable=not progress) as pbar:
        for _, (bt, mt) in stream_blocks([base, model], blocks, device):
            for name, w0 in bt.items():
                if name not in by_tensor:
                    others.update(_difference(name, w0, mt[name]))
                    continue
                module, fan = by_tensor[name]
                A, B, rel, change = extract_module(
                    w0, mt[name], rank, fan_in_fan_out=fan, dtype=out_dtype, driver=svd_driver, module=module
                )
                factors[f"{PREFIX}{module}.lora_A.weight"] = A.cpu().contiguous()
                factors[f"{PREFIX}{module}.lora_B.weight"] = B.cpu().contiguous()
                errors.append(ModuleError(module, tuple(base.tensors[name].shape), change, rel))
            pbar.update(1)
    errors.sort(key=lambda e: natural_key(e.module))
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules}) if not target_modules else list(target_modules)
    config = adapter_config(base_dir, rank, leaves, fan_in_fan_out=any(fan for _, fan in modules.values()))
    return Extraction(MergedAdapter(config, factors), errors, others)


def _difference(name: str, w0: torch.Tensor, w: torch.Tensor) -> dict[str, float | str]:
    """{name: relative change} of a tensor left out of the adapter, when the model changed it."""
    if w.shape != w0.shape:
        return {name: f"shape {list(w.shape)}, base has {list(w0.shape)}"}
    if not w0.is_floating_point() or torch.equal(w, w0.to(w.dtype)):
        return {}
    return {name: relative_change(w0, w)}


def adapter_config(base_dir: str | Path, rank: int, targets: list[str], fan_in_fan_out: bool) -> dict:
    """adapter_config.json of the extracted adapter: scale lora_alpha / r = 1, as PEFT writes it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def report_table(extraction: Extraction) -> str:
    """One line per module: shape, how much the fine-tune changed it, the relative error of the adapter."""
    width = max(len(e.module) for e in extraction.modules)
    lines = [f"{'module':<{width}}  {'shape':>12}  {'|D|/|W0|':>9}  {'rel. error':>10}"]
    for e in extraction.modules:
        shape = "x".join(map(str, e.shape))
        lines.append(f"{e.module:<{width}}  {shape:>12}  {e.relative_change:9.2e}  {e.relative_error:10.4f}")
    worst = max(extraction.modules, key=lambda e: e.relative_error)
    lines.append(f"largest relative error {worst.relative_error:.4f} ({worst.module})")
    if extraction.not_in_adapter:
        changed = ", ".join(list(extraction.not_in_adapter)[:4]) + (
            ", ..." if len(extraction.not_in_adapter) > 4 else ""
        )
        lines.append(f"{len(extraction.not_in_adapter)} tensors differ but are not in the adapter: {changed}")
    return "\n".join(lines)


def report_json(extraction: Extraction, base_dir, model_dir) -> dict:
    return {
        "extract": {
            "base": str(base_dir),
            "model": str(model_dir),
            "rank": extraction.adapter.config["r"],
            "modules": [asdict(e) for e in extraction.modules],
            "not_in_adapter": extraction.not_in_adapter,
        }
    }
