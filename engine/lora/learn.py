"""DivMerge over LoRA adapters: learn a coefficient per adapter (task level) or per adapter and block
(layer level) for the merged model

    W(Gamma) = W0 + sum_t Gamma_t s_t B_t A_t          for every adapted weight,

without ever forming B_t A_t: each adapted linear layer of the streamed base is a LowRankSumLinear
(blockmerge.lora.lowrank) whose coefficients are a tensor of the step, so autograd gives dL/dGamma straight
from the low-rank factors. StreamedLoraMerge is the LoRA implementation of blockmerge.learn.protocol; the
learner (batching, teacher cache, Adam, the `divmerge` flow) is blockmerge.learn.learner. The teacher of
task t is base + adapter t (the same modules with Gamma = e_t); the teachers of all tasks share the base's
passes, each row of a generation batch carrying its own one-hot coefficients.

Memory: the base's blocks that fit in the memory budget (kept in the compute dtype), else one base block
(two while the next is prefetched), + all adapters' factors + activations. With `quantize` (nf4, int8) the
forward passes (teachers and student alike) run on a bitsandbytes-quantized base."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from blockmerge.io.checkpoint import Checkpoint, block_name
from blockmerge.io.dtypes import parse_dtype
from blockmerge.io.stream import BlockSource
from blockmerge.learn import learner
from blockmerge.learn.learner import Batch, LearnResult
from blockmerge.learn.losses import check_objective
from blockmerge.learn.protocol import StreamedBase
from blockmerge.learn.settings import LearnSettings, nonempty
from blockmerge.learn.teacher import TeacherRun, TeacherSpec, fingerprint
from blockmerge.lora.adapter import (
    PREFIX,
    Adapter,
    AdapterError,
    MergedAdapter,
    read_adapters,
    target_modules,
    write_adapter,
)
from blockmerge.lora.into_base import merge_into_base
from blockmerge.lora.lowrank import QUANTIZE, LowRankState, LowRankSumLinear
from pydantic import BaseModel, ConfigDict, Field

# modules whose forward is x W^T + b (GPT-2's Conv1D: x W + b), what LowRankSumLinear computes
LINEAR_KINDS = ("Linear", "Conv1D", "FalconLinear")


class LoraLearnSettings(LearnSettings):
    """DivMerge settings over adapters: as for full experts, task level by default, plus `output` (base: the
    merged full checkpoint; adapter: an exact cat adapter carrying the coefficients) and `quantize` (none,
    nf4, int8: a bitsandbytes base for the forward passes)."""

    level: Literal["task", "layer"] = "task"
    token_chunk: int = Field(default=1024, ge=1)
    output: Literal["base", "adapter"] = "base"
    quantize: Literal["nf4", "int8"] | None = None


class AdapterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    data: str


class LoraDivMergeConfig(LoraLearnSettings):
    """`blockmerge lora divmerge` YAML: like `blockmerge divmerge`'s, with `adapters:` instead of `models:`."""

    base_model: str
    adapters: Annotated[list[AdapterEntry], nonempty("adapter")]


class StreamedLoraMerge(StreamedBase):
    """Base model streamed block by block with adapters as low-rank sums: loss and dL/dGamma."""

    command, entries, noun = "lora divmerge", ("adapters", "adapter"), "adapter"
    settings_type, config_type = LoraLearnSettings, LoraDivMergeConfig

    def __init__(self, base_dir, adapter_dirs, *, resident_max_bytes: int = 0, quantize: str | None = None,
                 **options):  # fmt: skip
        """`options`: device, dtype (compute), attn_implementation, token_chunk (StreamedBase; default 1024)."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize {quantize!r}: expected nf4, int8 or none")
        super().__init__(base_dir, **options)
        self.token_chunk = self.token_chunk or 1024
        self.adapter_dirs = [Path(a) for a in adapter_dirs]
        if not self.adapter_dirs:
            raise AdapterError("divmerge over adapters needs at least one adapter")
        self.adapters, names = read_adapters(self.adapter_dirs, self.base, base_given=True)
        self.source = BlockSource([self.base], device=self.device, resident_max_bytes=resident_max_bytes,
                                  dtype=self.dtype)  # fmt: skip
        self.T = len(self.adapters)
        self.state = LowRankState(len(self.blocks), quantize)
        self.adapted_blocks: set[int] = set()
        self._adapter_bytes = sum(a.nbytes() for a in self.adapters)
        self._install(names)
        for a in self.adapters:  # the low-rank modules hold their own (concatenated) copies
            a.modules.clear()

    @classmethod
    def open(cls, base_dir: Path, dirs: Sequence[Path], settings: LoraLearnSettings, budget: int):
        return super().open(base_dir, dirs, settings, budget, quantize=settings.quantize)

    def _install(self, names: dict[str, str]) -> None:
        sk = self.model.skeleton
        by_tensor: dict[str, list] = {}
        for t, a in enumerate(self.adapters):
            for mod, m in a.modules.items():
                by_tensor.setdefault(names[mod], []).append((t, m.A, m.B, m.scale))
        for tname, terms in by_tensor.items():
            path = self.model.module_names.get(tname, tname).removesuffix(".weight")  # as transformers loads it
            try:
                orig = sk.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"{self.base.path}: adapted tensor {tname} is not a module weight") from None
            kind = type(orig).__name__
            if path == self.model.spec.head:
                raise AdapterError(
                    f"{tname}: an adapter on the output projection is not supported by divmerge over adapters "
                    "(the head's loss is computed in token chunks straight from its weight)"
                )
            if kind not in LINEAR_KINDS:
                raise AdapterError(f"{tname}: adapters on {kind} modules are not supported (Linear only)")
            b = self.model.block_index[block_name(tname)]
            self.adapted_blocks.add(b)
            mod = LowRankSumLinear(orig, path, b, terms, self.state, kind == "Conv1D", self.dtype, self.device)
            parent, _, child = path.rpartition(".")
            setattr(sk.get_submodule(parent) if parent else sk, child, mod)

    def adapter_bytes(self) -> int:
        """Bytes of the adapters' factors as read."""
        return self._adapter_bytes

    def _params(self, block, tensors, rows) -> dict[str, torch.Tensor]:
        """The base block's tensors in the compute dtype (of the token embedding, only the batch's rows)."""
        emb = self.model.tokens_weight_name if block.name == "embed" else None
        return {k: (v[rows] if k == emb else v).to(self.dtype) for k, v in tensors[0].items()}

    def set_coefficients(self, gamma: torch.Tensor | None) -> None:
        """Coefficients for a whole pass: gamma [T, n_blocks] (or None: the plain base)."""
        for b in range(len(self.blocks)):
            self.state.coef[b] = None if gamma is None else gamma[:, b].to(self.device, self.dtype)

    def loss_and_grad(
        self, gamma: torch.Tensor, batch: Batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """Loss of `batch` at coefficients gamma [T, n_blocks] and, with `backward`, dL/dGamma [T, n_blocks]:
        the forward streams the base with the low-rank terms at gamma, keeping each layer's input on the host;
        the head's loss is computed in chunks; the backward recomputes each adapted layer (and those above
        it) in reverse, with that block's Gamma as a leaf."""
        check_objective(objective, batch.targets)
        gamma = gamma.detach().to(torch.float64).cpu()
        m, dev = self.model, self.device
        ids = batch.input_ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        rows = m.token_rows(ids)  # only the embedding rows of the batch's tokens are converted
        self.set_coefficients(gamma)
        try:
            acts: list[torch.Tensor | None] = []  # acts[l] = input of decoder layer l
            h = pe = masks = None
            for block, tensors in self.source.stream(self.blocks):
                if block.name == "head":
                    head = tensors
                    break
                W = self._params(block, tensors, rows)
                del tensors
                with torch.no_grad():
                    h, pe, masks = m.block_forward(block, W, ids, pos, rows, h, pe, masks)
                acts.append(h.to("cpu", copy=dev.type != "cpu"))
            del W
            loss, dh = self.head_step(head, gamma, h, batch, objective, backward)
            if not backward:
                return loss, None
            del head, h
            return loss, self._backward(gamma, dh, acts, pos, pe, masks)
        finally:
            self.set_coefficients(None)

    def _backward(self, gamma, dh, acts, pos, pe, masks) -> torch.Tensor:
        """Backward through the decoder layers, recomputing each one; nothing below the lowest adapted one."""
        m, dev, st = self.model, self.device, self.state
        grad = torch.zeros(self.T, len(self.blocks), dtype=torch.float64)
        adapted_layers = [self.blocks[b].layer for b in self.adapted_blocks if self.blocks[b].layer is not None]
        lowest = min(adapted_layers, default=m.num_layers)
        layers = [bk for bk in self.blocks if bk.layer is not None and bk.layer >= lowest]
        for block, tensors in self.source.stream(list(reversed(layers))):
            b = m.block_index[block.name]
            W = self._params(block, tensors, None)
            del tensors
            g_leaf = None
            if b in self.adapted_blocks:
                g_leaf = st.coef[b] = gamma[:, b].to(dev, self.dtype).requires_grad_(True)
            h_in = acts[block.layer].to(dev).requires_grad_(True)
            out = m.layer(block.layer, W, h_in, position_ids=pos, position_embeddings=pe, masks=masks)
            out.backward(dh)
            dh = h_in.grad
            acts[block.layer] = None
            if g_leaf is not None:
                grad[:, b] += g_leaf.grad.to(grad)
            del W, out, h_in
        return grad.float()

    def head_step(self, tensors, gamma, h, batch: Batch, objective: str, backward: bool, grad=None):
        """Final norm + output projection + divergence at the batch's target positions (no adapter there):
        the loss and, with `backward`, dL/dh."""
        m = self.model
        W = self._params(m.head_block(), tensors, None)
        tied = self.source.read(m.embed_block())[0][m.tokens_weight_name] if m.tied else None
        head_w = tied.to(self.dtype) if m.tied else W[m.head_weight_name]
        return m.head_loss(W, head_w, h, batch, objective, self.token_chunk, backward)

    # ---- one block at a time: the pieces of a pipeline stage (blockmerge.learn.pipeline) ----------------
    def learns(self, b: int) -> bool:
        """Whether block b has a coefficient gradient (it holds an adapted module)."""
        return b in self.adapted_blocks

    def block_weights(self, block, tensors, coeffs: torch.Tensor, rows, grad_col: torch.Tensor | None = None):
        """(weights, finish) of one block: the base's tensors, with its low-rank terms at `coeffs` (Gamma[:, b]);
        with `grad_col` [T] and an adapted block, the coefficients are a leaf and finish() adds its gradient."""
        b = self.model.block_index[block.name]
        W = self._params(block, tensors, rows)
        coef = self.state.coef[b] = coeffs.to(self.device, self.dtype).clone()
        if grad_col is None or b not in self.adapted_blocks:
            return W, None
        coef.requires_grad_(True)

        def finish() -> None:
            if coef.grad is not None:
                grad_col.add_(coef.grad.to(grad_col))

        return W, finish

    # ---- teachers: base + adapter t, all tasks in the same passes -------------------------------------
    def teacher_key(self, t: int) -> tuple[str, list]:
        a = self.adapter_dirs[t]
        return f"lora-{a.name}", [str(self.base.path.resolve()), fingerprint(self.base.path), str(a.resolve()),
                                  fingerprint(a), self.state.quantize, str(self.dtype)]  # fmt: skip

    def teachers(self, tasks: Sequence[int], spec: TeacherSpec):
        """One pass over the base serves every adapter: each row's coefficients are one-hot on its task."""
        eye = torch.eye(self.T, dtype=torch.float64)

        def select(row_tasks: list[int]) -> None:
            coef = eye[row_tasks].to(self.device, self.dtype)  # [batch, T]
            for b in range(len(self.blocks)):
                self.state.coef[b] = coef

        try:
            yield TeacherRun(list(tasks), self.model, self.source, self.dtype, select)
        finally:
            self.set_coefficients(None)

    @staticmethod
    def write(base_dir, dirs, coefficients, out, settings, *, force, progress, info) -> Path:
        return write_learned(base_dir, dirs, coefficients, out, output=settings.output, force=force,
                             dtype=settings.dtype, device=settings.device, progress=progress, info=info)  # fmt: skip


def write_learned(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    coefficients: torch.Tensor,
    out: str | Path,
    *,
    output: str = "base",
    force: bool = False,
    dtype=None,
    device=None,
    progress: bool = True,
    info: dict | None = None,
) -> Path:
    """The learned merge: a full checkpoint W0 + sum_t Gamma[t, block] s_t B_t A_t (output='base'), or an
    exact cat adapter whose module blocks carry Gamma[t, block(module)] (output='adapter')."""
    inputs = [base_dir, *adapter_dirs]
    if output == "base":
        return merge_into_base(
            base_dir,
            adapter_dirs,
            None,
            out,
            coefficients=coefficients,
            force=force,
            dtype=parse_dtype(dtype),
            device=device,
            progress=progress,
            extra_json={"divmerge.json": info or {}},
        )
    base = Checkpoint(base_dir)
    adapters, names = read_adapters(adapter_dirs, base, base_given=True)
    index = {b.name: i for i, b in enumerate(base.blocks())}
    coeffs = torch.as_tensor(coefficients, dtype=torch.float32)
    rank = sum(a.r for a in adapters)
    tensors = {}
    for mod in sorted({m for a in adapters for m in a.modules}):
        b = index[block_name(names[mod])]
        parts = [(a.modules[mod], float(coeffs[t, b])) for t, a in enumerate(adapters) if mod in a.modules]
        A = torch.cat([m.A.float() * (g * m.scale) for m, g in parts])
        B = torch.cat([m.B.float() for m, _ in parts], dim=1)
        A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
        dt = adapters[0].dtype
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = A.to(dt).contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = B.to(dt).contiguous()
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, target_modules=target_modules(adapters), alpha_pattern={},
                  rank_pattern={}, use_rslora=False)  # fmt: skip
    return write_adapter(MergedAdapter(config, tensors), out, force=force, info=info, inputs=inputs)


def learn(base_dir, adapter_dirs, inputs, settings: LoraLearnSettings | None = None, **overrides) -> LearnResult:
    """Learn adapter coefficients. `inputs[t]` are adapter t's task prompts (token id lists); `settings`
    (LoraLearnSettings) with keyword `overrides` of its fields, `progress` and `num_threads`, as
    blockmerge.learn.full.learn. Returns coefficients [T, n_blocks] (blocks without adapted modules keep
    their initial value)."""
    return learner.learn(StreamedLoraMerge, base_dir, adapter_dirs, inputs, settings, **overrides)


def run_divmerge(config, out, *, force=False, steps=None, device=None, output=None, progress=True, memory=None):
    """`blockmerge lora divmerge CONFIG OUT`: learn and write (blockmerge.learn.learner.run_divmerge)."""
    return learner.run_divmerge(StreamedLoraMerge, config, out, force=force, progress=progress, steps=steps,
                                device=device, memory=memory, output=output)  # fmt: skip


def run_divmerge_cli(args) -> int:
    """`blockmerge lora divmerge` from its argparse namespace (config, out, steps, device, output, force,
    no_progress, memory)."""
    run_divmerge(args.config, args.out, force=args.force, steps=args.steps, device=args.device, output=args.output,
                 progress=not getattr(args, "no_progress", False), memory=getattr(args, "memory", None))  # fmt: skip
    return 0


__all__ = ["StreamedLoraMerge", "LoraLearnSettings", "learn", "write_learned", "run_divmerge", "Adapter"]
