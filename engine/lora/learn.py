"""DivMerge over LoRA adapters: learn a coefficient per adapter (task level) or per adapter and block
(layer level) for the merged model

    W(Gamma) = W0 + sum_t Gamma_t s_t B_t A_t          for every adapted weight,

without ever forming B_t A_t. Each adapted linear layer of the streamed base model (blockmerge.learn.model's
meta skeleton run with torch.func.functional_call) is replaced by a module computing

    y = x W0^T (+ b) + sum_t Gamma_t s_t (x A_t^T) B_t^T

with Gamma a tensor of the step, so autograd gives dL/dGamma_t = s_t sum_tokens <dL/dy, (x A_t^T) B_t^T>
straight from the low-rank factors. The rest is blockmerge.learn.full's machinery: the teacher of task t is
base + adapter t (the same modules with Gamma = e_t) whose greedy continuations and distributions are cached
by blockmerge.learn.teacher; the student step streams the base block by block, keeps block inputs on the host,
computes the loss at the head in chunks of positions (blockmerge.learn.losses), then backpropagates block by
block in reverse, recomputing each block, with Gamma of that block as a leaf.

Memory: the base's blocks that fit in the memory budget (kept in the compute dtype), else one base block
(two while the next is prefetched), + all adapters' factors + activations.

Optional bitsandbytes base (`quantize: nf4 | int8`): the adapted weights of each block are quantized when
the block is used (nf4: bnb.functional.quantize_4bit + bnb.matmul_4bit; int8: LLM.int8 vector-wise
quantization + bnb.matmul, no outlier threshold) and the forward runs through bitsandbytes' kernels, as in
QLoRA; the low-rank terms stay in the compute dtype. It changes the numerics of the forward passes (teacher
and student alike), not what is read from disk."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from blockmerge.io.cache import teacher_cache
from blockmerge.io.checkpoint import Checkpoint, block_name
from blockmerge.io.commit import claim_output
from blockmerge.io.dtypes import parse_dtype
from blockmerge.io.stream import BlockSource, memory_budget
from blockmerge.learn.full import (
    LEVELS,
    SMALL_MODEL_BYTES,
    Batch,
    LearnResult,
    LearnSettings,
    check_learning,
    check_prompts,
    input_files,
    learn_kwargs,
    load_yaml_config,
    optimize,
    resolve_inputs,
)
from blockmerge.learn.losses import OBJECTIVES, chunked_head_loss
from blockmerge.learn.model import StreamedModel
from blockmerge.learn.teacher import ChunkWriter, TeacherData, TeacherSpec, continuations, fingerprint, step_targets
from blockmerge.lora.adapter import Adapter, AdapterError, read_adapters
from pydantic import BaseModel, ConfigDict, Field, field_validator

QUANTIZE = (None, "nf4", "int8")


class _State:
    """Shared by the low-rank modules of one model: the coefficients of the pass and quantized weights."""

    def __init__(self, n_blocks: int, quantize: str | None):
        self.coef: list[torch.Tensor | None] = [None] * n_blocks  # [T] per block, None = adapters off
        self.quantize = quantize
        self.qcache: dict[str, tuple] = {}
        self.qblock: int | None = None


def _quantize(w: torch.Tensor, kind: str):
    import bitsandbytes.functional as bnbF

    if kind == "nf4":
        return bnbF.quantize_4bit(w.detach().to(torch.float32), quant_type="nf4")
    CB, SCB, _ = bnbF.int8_vectorwise_quant(w.detach().to(torch.float16))
    return CB, SCB


def _quant_linear(x: torch.Tensor, q, kind: str, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb

    if kind == "nf4":
        packed, st = q
        y = bnb.matmul_4bit(x, packed.t(), quant_state=st)
    else:
        from bitsandbytes.autograd._functions import MatmulLtState

        CB, SCB = q
        state = MatmulLtState()
        state.CB, state.SCB, state.has_fp16_weights, state.threshold = CB, SCB, False, 0.0
        y = bnb.matmul(x.to(torch.float16), CB, state=state).to(x.dtype)
    return y if bias is None else y + bias


class LowRankSumLinear(torch.nn.Module):
    """Stands in for an adapted nn.Linear (or GPT-2 Conv1D) of the skeleton: `weight`/`bias` are supplied
    by functional_call like the original's; adds sum_t Gamma_t s_t (x A_t^T) B_t^T."""

    def __init__(
        self,
        orig: torch.nn.Module,
        name: str,
        block: int,
        terms: list[tuple[int, torch.Tensor, torch.Tensor, float]],
        state: _State,
        conv1d: bool,
        dtype: torch.dtype,
        device,
    ):
        super().__init__()
        self.weight = orig.weight  # meta placeholders: functional_call substitutes the block's tensors
        self.bias = getattr(orig, "bias", None)
        self.name, self.block, self.state, self.conv1d = name, block, state, conv1d
        # factors of all adapters concatenated along the rank: z = x A^T [.., R]; column c belongs to task[c]
        self.A = torch.cat([A for _, A, _, _ in terms]).to(device, dtype)
        self.B = torch.cat([B for _, _, B, _ in terms], dim=1).to(device, dtype)
        self.task = torch.cat([torch.full((A.shape[0],), t) for t, A, _, _ in terms]).to(device)
        self.scale = torch.cat([torch.full((A.shape[0],), s, dtype=dtype) for _, A, _, s in terms]).to(device)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.quantize is not None:
            if st.qblock != self.block:  # one block's quantized weights at a time
                st.qcache.clear()
                st.qblock = self.block
            q = st.qcache.get(self.name)
            if q is None:
                w = self.weight.T if self.conv1d else self.weight
                q = st.qcache[self.name] = _quantize(w, st.quantize)
            return _quant_linear(x, q, st.quantize, self.bias)
        if self.conv1d:
            y = x @ self.weight
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        g = self.state.coef[self.block]
        if g is None:
            return y
        z = x @ self.A.T
        col = g.to(self.scale)[..., self.task] * self.scale  # Gamma_t s_t per rank column: [R], or [batch, R]
        if col.dim() == 2 and z.dim() == 3:  # per-row coefficients (teachers of several tasks in one batch)
            col = col[:, None, :]
        return y + (z * col) @ self.B.T


class StreamedLoraMerge:
    """Base model streamed block by block with adapters as low-rank sums: loss and dL/dGamma."""

    def __init__(
        self,
        base_dir: str | Path,
        adapter_dirs: Sequence[str | Path],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        token_chunk: int = 1024,
        resident_max_bytes: int = 0,
        quantize: str | None = None,
    ):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize {quantize!r}: expected nf4, int8 or none")
        self.base = Checkpoint(base_dir)
        self.adapter_dirs = [Path(a) for a in adapter_dirs]
        if not self.adapter_dirs:
            raise AdapterError("divmerge over adapters needs at least one adapter")
        self.adapters, names = read_adapters(self.adapter_dirs, self.base, base_given=True)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = StreamedModel(self.base, attn_implementation=attn_implementation, device=self.device)
        self.source = BlockSource([self.base], device=self.device, resident_max_bytes=resident_max_bytes, dtype=dtype)
        self.token_chunk = token_chunk
        self.blocks = self.model.blocks
        self.block_names = self.model.block_names
        self.T = len(self.adapters)
        self.state = _State(len(self.blocks), quantize)
        self.adapted_blocks: set[int] = set()
        self._adapter_bytes = sum(a.nbytes() for a in self.adapters)
        self._install(names)
        for a in self.adapters:  # the low-rank modules hold their own (concatenated) copies
            a.modules.clear()

    def _install(self, names: dict[str, str]) -> None:
        sk = self.model.skeleton
        by_tensor: dict[str, list] = {}
        for t, a in enumerate(self.adapters):
            for mod, m in a.modules.items():
                by_tensor.setdefault(names[mod], []).append((t, m.A, m.B, m.scale))
        for tname, terms in by_tensor.items():
            path = tname.removesuffix(".weight")
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
            if kind not in ("Linear", "Conv1D"):
                raise AdapterError(f"{tname}: adapters on {kind} modules are not supported (Linear only)")
            b = self.model.block_index[block_name(tname)]
            self.adapted_blocks.add(b)
            mod = LowRankSumLinear(orig, path, b, terms, self.state, kind == "Conv1D", self.dtype, self.device)
            parent, _, child = path.rpartition(".")
            setattr(sk.get_submodule(parent) if parent else sk, child, mod)

    def adapter_bytes(self) -> int:
        """Bytes of the adapters' factors as read."""
        return self._adapter_bytes

    def _params(self, tensors) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype) for k, v in tensors[0].items()}

    def set_coefficients(self, gamma: torch.Tensor | None) -> None:
        """Coefficients for a whole pass: gamma [T, n_blocks] (or None: the plain base)."""
        for b in range(len(self.blocks)):
            self.state.coef[b] = None if gamma is None else gamma[:, b].to(self.device, self.dtype)

    def loss_and_grad(
        self, gamma: torch.Tensor, batch: Batch, objective: str = "js", backward: bool = True
    ) -> tuple[float, torch.Tensor | None]:
        """Loss of `batch` at coefficients gamma [T, n_blocks] and, with `backward`, dL/dGamma [T, n_blocks]."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if objective != "entropy" and batch.targets is None:
            raise ValueError(f"objective {objective!r} needs teacher distributions")
        gamma = gamma.detach().to(torch.float64).cpu()
        m, dev, st = self.model, self.device, self.state
        ids = batch.input_ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        rows = m.token_rows(ids)  # only the embedding rows of the batch's tokens are converted
        grad = torch.zeros(self.T, len(self.blocks), dtype=torch.float64)
        self.set_coefficients(gamma)
        acts: list[torch.Tensor | None] = []  # acts[l] = input of decoder layer l
        h = pe = masks = None
        loss = 0.0
        for block, tensors in self.source.stream(self.blocks):
            b = m.block_index[block.name]
            if block.name == "embed":
                W = {k: (v[rows] if k == m.tokens_weight_name else v).to(self.dtype) for k, v in tensors[0].items()}
            else:
                W = self._params(tensors)
            del tensors
            if block.name != "head":
                with torch.no_grad():
                    if block.name == "embed":
                        h = m.embed(W, ids, pos, rows)
                        pe = m.position_embeddings(h, pos)
                        masks = m.masks(h, pos)
                    else:
                        acts.append(h.to("cpu", copy=dev.type != "cpu"))
                        h = m.layer(block.layer, W, h, position_ids=pos, position_embeddings=pe, masks=masks)
                del W
                continue
            if m.tied:
                head_w = self.source.read(m.embed_block())[0][m.tokens_weight_name].to(self.dtype)
            else:
                head_w = W[m.head_weight_name]
            hsel = h[batch.rows.to(dev), batch.cols.to(dev)].detach().requires_grad_(backward)
            norm = lambda x, W=W: m.final_norm(W, x)
            loss = chunked_head_loss(
                hsel,
                batch.weights,
                batch.targets,
                objective,
                norm,
                head_w,
                W.get(m.head_bias_name),
                self.token_chunk,
                backward,
            )
            if not backward:
                self.set_coefficients(None)
                return loss, None
            dh = torch.zeros_like(h)
            dh.index_put_((batch.rows.to(dev), batch.cols.to(dev)), hsel.grad, accumulate=True)
            del W, head_w, hsel, h
        # backward through the decoder layers, recomputing each one; nothing below the lowest adapted layer
        adapted_layers = [self.blocks[b].layer for b in self.adapted_blocks if self.blocks[b].layer is not None]
        lowest = min(adapted_layers, default=self.model.num_layers)
        layers = [bk for bk in self.blocks if bk.layer is not None and bk.layer >= lowest]
        for block, tensors in self.source.stream(list(reversed(layers))):
            b = m.block_index[block.name]
            W = self._params(tensors)
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
        self.set_coefficients(None)
        return loss, grad.float()

    # ---- teachers: base + adapter t, all tasks in the same passes -------------------------------------
    def _teacher_key(self, t: int, prompts: list[list[int]], spec: TeacherSpec) -> str:
        h = hashlib.sha256()
        ident = [str(self.base.path.resolve()), fingerprint(self.base.path), str(self.adapter_dirs[t].resolve()),
                 fingerprint(self.adapter_dirs[t]), asdict(spec), self.state.quantize, str(self.dtype)]  # fmt: skip
        h.update(json.dumps(ident).encode())
        h.update(json.dumps(prompts).encode())
        return h.hexdigest()[:20]

    def teacher_folders(self, inputs, cache_dir: str | Path, spec: TeacherSpec, progress=True) -> list[Path]:
        """Greedy continuations and distributions of each teacher base + adapter t on task t's prompts,
        cached in cache_dir/lora-{adapter folder name}-{key} in blockmerge.learn.teacher's format (read back by
        TeacherData; the key hashes base, adapter, prompts and settings, so one cache_dir serves any run).

        The teachers share the base, so prompts of all tasks go through the same streamed passes: each row
        of a batch carries its own coefficients (one-hot on its task), and one pass over the base serves
        every adapter."""
        from blockmerge.io.report import progress as bar

        cache_dir = Path(cache_dir)
        prompts = [[list(map(int, p)) for p in x] for x in inputs]
        keys = [self._teacher_key(t, p, spec) for t, p in enumerate(prompts)]
        folders = [cache_dir / f"lora-{self.adapter_dirs[t].name}-{k}" for t, k in enumerate(keys)]
        todo = []
        for t, (folder, key) in enumerate(zip(folders, keys, strict=True)):
            manifest = folder / "manifest.json"
            try:
                if manifest.exists() and json.loads(manifest.read_text()).get("key") == key:
                    continue
            except json.JSONDecodeError:
                pass
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("chunk*.pt"):
                old.unlink()
            manifest.unlink(missing_ok=True)
            todo.append(t)
        if not todo:
            return folders
        vocab, full, eos, keep = step_targets(self.model.config, spec)
        writers = {t: ChunkWriter(folders[t], spec, full) for t in todo}
        pairs = [(t, i) for t in todo for i in range(len(prompts[t]))]
        for t, i in pairs:
            if not prompts[t][i]:
                raise ValueError(f"prompt {i} of adapter {self.adapter_dirs[t]} is empty")
        eye = torch.eye(self.T, dtype=torch.float64)

        def onehot(rows: list[int]) -> None:  # each row of the batch: coefficients one-hot on its task
            coef = eye[[pairs[r][0] for r in rows]].to(self.device, self.dtype)  # [batch, T]
            for b in range(len(self.blocks)):
                self.state.coef[b] = coef

        flat = [prompts[t][i] for t, i in pairs]
        try:
            with bar(len(pairs), "teacher", unit="seq", disable=not progress) as pbar:
                for r, cont, targets in continuations(
                    self.model, self.source, flat, spec, eos, keep, onehot, self.dtype
                ):
                    t, i = pairs[r]
                    writers[t].add(i, prompts[t][i], cont, targets)
                    pbar.update(1)
        finally:
            self.set_coefficients(None)
        for t in todo:
            writers[t].flush()
            info = {"key": keys[t], "chunks": writers[t].sizes, "full_vocab": full, "vocab": vocab,
                    "n_seqs": len(prompts[t]), "spec": asdict(spec)}  # fmt: skip
            (folders[t] / "manifest.json").write_text(json.dumps(info))
        return folders


def learn(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    inputs: Sequence[Sequence[Sequence[int]]],
    *,
    level: Literal["task", "layer"] = "task",
    objective: Literal["js", "kl", "entropy"] = "js",
    steps: int | None = 100,
    epochs: float | None = None,
    lr: float = 1e-2,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    init: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    topk: int = 64,
    full_vocab_max: int = 4096,
    token_chunk: int = 1024,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    resident_max_bytes: int | None = None,
    quantize: str | None = None,
    num_threads: int | None = None,
    memory: int | str | None = None,
) -> LearnResult:
    """Learn adapter coefficients. `inputs[t]` are adapter t's task prompts (token id lists).
    `memory`, `resident_max_bytes`, `cache_dir`: as blockmerge.learn.full.learn (base blocks kept resident
    within the budget; teacher passes under `<blockmerge cache>/teacher` by default).
    Returns coefficients [T, n_blocks] (blocks without adapted modules keep their initial value).
    `num_threads`: torch intra-op threads while learning (restored after); default as blockmerge.learn.full
    (1 for models under SMALL_MODEL_BYTES, else unchanged)."""
    if num_threads is None and Checkpoint(base_dir).nbytes < SMALL_MODEL_BYTES:
        num_threads = 1
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _learn(**{k: v for k, v in locals().items() if k not in ("previous", "num_threads")})
    finally:
        torch.set_num_threads(previous)


def _learn(base_dir, adapter_dirs, inputs, *, level, objective, steps, epochs, lr, batch_size, max_new_tokens,
           eos_token_id, init, seed, device, cache_dir, progress, topk, full_vocab_max, token_chunk, dtype,
           attn_implementation, resident_max_bytes, quantize, memory) -> LearnResult:  # fmt: skip
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if len(inputs) != len(adapter_dirs):
        raise ValueError(f"inputs: {len(inputs)} prompt lists for {len(adapter_dirs)} adapters")
    for t, x in enumerate(inputs):
        if not x:
            raise ValueError(f"inputs[{t}]: no prompts for adapter {adapter_dirs[t]}")
    check_learning(steps, epochs, lr, init)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r}: expected float32 or float64")
    budget = memory_budget(memory if resident_max_bytes is None else resident_max_bytes, device)
    config = dict(level=level, objective=objective, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, init=init, seed=seed, device=device,
                  topk=topk, full_vocab_max=full_vocab_max, token_chunk=token_chunk, dtype=dtype,
                  quantize=quantize)  # fmt: skip
    merge = StreamedLoraMerge(
        base_dir,
        adapter_dirs,
        device=device,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        token_chunk=token_chunk,
        resident_max_bytes=budget,
        quantize=quantize,
    )
    check_prompts(inputs, merge.model.config.get_text_config().vocab_size, adapter_dirs)
    spec = TeacherSpec(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, full_vocab_max=full_vocab_max,
                       topk=topk, store_dists=objective != "entropy")  # fmt: skip
    data = TeacherData(merge.teacher_folders(inputs, cache_dir or teacher_cache(), spec, progress))
    return optimize(merge, data, level=level, objective=objective, steps=steps, epochs=epochs, lr=lr,
                    batch_size=batch_size, init=init, seed=seed, progress=progress, config=config,
                    desc=f"lora divmerge {objective}/{level}")  # fmt: skip


# ---- configuration file and CLI -------------------------------------------------------------------------


class AdapterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    data: str


class LoraDivMergeConfig(LearnSettings):
    """`blockmerge lora divmerge` YAML: like `blockmerge divmerge`'s, with `adapters:` instead of `models:`,
    plus `output` (base: merged full checkpoint; adapter: an exact cat adapter carrying the coefficients)
    and `quantize` (none, nf4, int8: bitsandbytes base for the forward passes)."""

    adapters: list[AdapterEntry]
    level: Literal["task", "layer"] = "task"
    token_chunk: int = Field(default=1024, ge=1)
    output: Literal["base", "adapter"] = "base"
    quantize: Literal["nf4", "int8"] | None = None

    @field_validator("adapters")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("at least one adapter is needed")
        return v


def load_config(path: str | Path | dict) -> tuple[LoraDivMergeConfig, Path]:
    return load_yaml_config(path, LoraDivMergeConfig, "adapters")


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
    from blockmerge.lora.adapter import PREFIX, MergedAdapter, write_adapter
    from blockmerge.lora.into_base import merge_into_base

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
    from blockmerge.lora.adapter import target_modules as _target_modules

    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, target_modules=_target_modules(adapters), alpha_pattern={},
                  rank_pattern={}, use_rslora=False)  # fmt: skip
    return write_adapter(MergedAdapter(config, tensors), out, force=force, info=info, inputs=inputs)


def run_divmerge(config, out, *, force=False, steps=None, device=None, output=None, progress=True, memory=None):
    """Learn and write: every setting, path and prompt is checked first; OUT is claimed (writer.OutputClaim)
    for the whole run, learning included."""
    cfg, root = load_config(config)
    kwargs = learn_kwargs(cfg, steps=steps, device=device, progress=progress, memory=memory)
    base_dir, adapter_dirs, inputs = resolve_inputs(cfg, root, "adapters", "adapter")
    used = [base_dir, *adapter_dirs, *input_files(cfg, root, "adapters")]
    used += [config] if not isinstance(config, dict) else []
    with claim_output(out, force=force, inputs=used):
        return _run_divmerge(cfg, base_dir, adapter_dirs, inputs, kwargs, Path(out), force, device, output, progress)


def _run_divmerge(cfg, base_dir, adapter_dirs, inputs, kwargs, out, force, device, output, progress):
    started = time.perf_counter()
    res = learn(base_dir, adapter_dirs, inputs, **kwargs, quantize=cfg.quantize)
    info = res.to_json()
    info.update(base_model=str(base_dir), adapters=[str(d) for d in adapter_dirs], config=cfg.model_dump())
    path = write_learned(
        base_dir,
        adapter_dirs,
        res.coefficients,
        out,
        output=output or cfg.output,
        force=force,
        dtype=cfg.dtype,
        device=device or cfg.device,
        progress=progress,
        info=info,
    )
    if progress:
        from blockmerge.io.report import final_line

        print(
            final_line(
                f"lora divmerge: {len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
                f"wrote {path}",
                started,
            ),
            file=sys.stderr,
        )
    return path, res


def run_divmerge_cli(args) -> int:
    run_divmerge(
        args.config,
        args.out,
        force=args.force,
        steps=args.steps,
        device=args.device,
        output=args.output,
        progress=not getattr(args, "no_progress", False),
        memory=getattr(args, "memory", None),
    )
    return 0


__all__ = ["StreamedLoraMerge", "learn", "write_learned", "run_divmerge", "load_config", "Adapter"]
