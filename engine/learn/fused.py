"""Checkpoint tensors -> the parameters of transformers' modules, by transformers' own conversion on load
(transformers.conversion_mapping): its renamings (GPT-NeoX's embed_out is lm_head, Mixtral's
block_sparse_moe is mlp) and its converters that fuse per-expert tensors into one parameter (Mixtral's
experts.N.w1 and experts.N.w3 stacked, then concatenated into mlp.experts.gate_up_proj).

The converters' operations are run as transformers runs them on load, minus their no-grad decorator: on
merged tensors that require grad, the fused parameter stays differentiable, so dL/dGamma flows back to
each expert's tensors exactly. Only operations known to be plain differentiable tensor reshuffles are
run; any other converter is refused (blockmerge.learn.guard turns that into a refusal of the
architecture). Memory: while a layer runs, its fused parameters are one more copy of its merged experts."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


def _differentiable_ops() -> tuple[type, ...]:
    from transformers.core_model_loading import Concatenate, MergeModulelist

    return (MergeModulelist, Concatenate)  # torch.stack / torch.cat


@dataclass
class Fusion:
    """One fused parameter: the converter, and the checkpoint tensors per source pattern in load order."""

    converter: object  # transformers.core_model_loading.WeightConverter
    sources: dict[str, list[str]] = field(default_factory=dict)

    def fuse(self, tensors: dict[str, torch.Tensor], target: str) -> torch.Tensor:
        conv = self.converter
        collected = {pattern: [tensors[n] for n in names] for pattern, names in self.sources.items()}
        for op in conv.operations:
            if not isinstance(op, _differentiable_ops()):
                raise ValueError(f"{target}: transformers' conversion {type(op).__name__} is not supported")
            convert = inspect.unwrap(type(op).convert)  # transformers' own op, without @torch.no_grad
            collected = convert(op, collected, source_patterns=conv.source_patterns,
                                target_patterns=conv.target_patterns)  # fmt: skip
        (out,) = collected.values()
        return out


class ModuleLayout:
    """How a checkpoint's tensors become `model`'s parameters: `names` maps every checkpoint tensor to the
    parameter it feeds (a fused one for per-expert tensors), `fusions` the fused parameters."""

    def __init__(self, model: torch.nn.Module, tensors: list[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key

        mapping = get_model_conversion_mapping(model)
        renames = [t for t in mapping if type(t) is WeightRenaming]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self.names: dict[str, str] = {}
        self.fusions: dict[str, Fusion] = {}
        for name in sorted(tensors, key=dot_natural_key):  # the loader's order: experts 0, 1, ..., 10
            new = name
            for r in renames:
                new = r.rename_source_key(new)[0]
            for conv in converters:  # at most one converter applies, as on load
                fused, pattern = conv.rename_source_key(new)
                if pattern is not None:
                    new = fused
                    self.fusions.setdefault(new, Fusion(conv)).sources.setdefault(pattern, []).append(name)
                    break
            self.names[name] = new

    def members(self, target: str) -> list[str]:
        """The checkpoint tensors of parameter `target` (one, or those fused into it)."""
        if target in self.fusions:
            return [n for names in self.fusions[target].sources.values() for n in names]
        return [n for n, t in self.names.items() if t == target]

    def to_modules(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{checkpoint name: tensor} -> {parameter name: tensor}, per-expert tensors fused (all of a fused
        parameter's tensors must be in `params`: they are in one block)."""
        out, pending = {}, {}
        for k, v in params.items():
            new = self.names.get(k, k)
            if new in self.fusions:
                pending.setdefault(new, {})[k] = v
            else:
                out[new] = v
        for target, got in pending.items():
            missing = [n for n in self.members(target) if n not in got]
            if missing:
                raise ValueError(f"{target}: fused from {missing[0]}, which is not in the same block")
            out[target] = self.fusions[target].fuse(got, target)
        return out
