"""Streamed forward of a decoder LLM straight from its checkpoint, one block at a time.

The model is built once on the meta device from its config (transformers' own module classes, no
memory); each block is then run with `torch.func.functional_call`, its parameters supplied as plain
tensors read from the checkpoint (or merged from several checkpoints) just before use. What is not
a layer is the model's own code: the embeddings, masks and position embeddings come from its decoder's
forward run up to the first layer (`embed_context`), the final logit transformation from its
*ForCausalLM forward (`final_logits`). blockmerge.learn.guard checks the whole against transformers
before any learning.

Block names follow `blockmerge.io.checkpoint`: 'embed', 'layers.{i}', 'head'. With tied embeddings the
head has no tensor of its own for the output projection: it reuses the embed block's token embedding."""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Block, Checkpoint, CheckpointError
from blockmerge.io.stream import BlockSource
from blockmerge.learn.fused import ModuleLayout
from blockmerge.learn.losses import chunked_head_loss
from torch.func import functional_call


@dataclass(frozen=True)
class ArchSpec:
    """Where a *ForCausalLM keeps its pieces (module paths), read from the model itself."""

    tokens: str  # token embedding module
    layers: str  # ModuleList of decoder layers
    norm: str  # final norm
    head: str  # output projection
    rotary: str | None  # rotary embedding module of the decoder, built for real


NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def arch_spec(model: torch.nn.Module, n_layers: int, tensors: set[str]) -> ArchSpec | None:
    """The pieces of `model` (None when its layout is not a decoder with a final norm and a head). A module
    with several names (GPT-NeoX's embed_out is also lm_head) goes by the one the checkpoint's tensors use."""
    names: dict = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n and (m not in names or f"{n}.weight" in tensors):
            names[m] = n
    tokens, head = names.get(model.get_input_embeddings()), names.get(model.get_output_embeddings())
    layers = next((n for m, n in names.items() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)
    if tokens is None or head is None or layers is None:
        return None
    decoder = layers.rpartition(".")[0]
    children = dict(_get(model, decoder).named_children())
    norm = next((f"{decoder}.{n}" for n in NORMS if n in children), None)
    rotary = f"{decoder}.rotary_emb" if "rotary_emb" in children else None
    return None if norm is None else ArchSpec(tokens, layers, norm, head, rotary)


@functools.cache
def _cache_kwarg(fn) -> str:
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def cache_kwarg(fn) -> str:
    """The KV-cache keyword of a transformers layer or mask function: `cache` since transformers 5.24,
    `past_key_values` before (the old name warns until 5.40)."""
    return _cache_kwarg(getattr(fn, "__func__", fn))


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path)


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class _Record(torch.nn.Module):
    """Stands for decoder layer i in `embed_context`: records its keyword arguments; the last one stops."""

    def __init__(self, calls: list, i: int, first: list, layer: torch.nn.Module):
        super().__init__()
        self.calls, self.i, self.first = calls, i, first
        self.signature = inspect.signature(layer.forward)

    def forward(self, hidden_states, *args, **kwargs):
        # positional arguments (GPT-2 passes the mask so) become keywords of the real layer
        bound = self.signature.bind_partial(hidden_states, *args, **kwargs).arguments
        var = [n for n, p in self.signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        extra = bound.pop(var[0], {}) if var else {}
        first_name = next(iter(self.signature.parameters))
        self.calls[self.i] = {k: v for k, v in {**bound, **extra}.items() if k != first_name}
        if self.i == 0:
            self.first.append(hidden_states)  # the embeddings
        if self.i == len(self.calls) - 1:
            raise _Stop(self.first[0])
        return hidden_states


@functools.cache
def _decoder_output() -> type:
    """A decoder output holding only hidden states; other fields read by a *ForCausalLM (MoE router_logits,
    used only for the auxiliary loss) are None."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Out

    class HiddenOnly(Out):
        def __getattr__(self, name):
            if name.startswith("_"):
                raise AttributeError(name)
            return None

    return HiddenOnly


class _Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


@contextlib.contextmanager
def _swapped(root: torch.nn.Module, swaps: list[tuple[str, torch.nn.Module]]):
    """Submodules of `root` (dotted paths) replaced by stand-ins for the duration."""
    slots = [(_get(root, p) if p else root, name) for p, _, name in (path.rpartition(".") for path, _ in swaps)]
    old = [getattr(m, name) for m, name in slots]
    try:
        for (m, name), (_, new) in zip(slots, swaps, strict=True):
            setattr(m, name, new)
        yield
    finally:
        for (m, name), o in zip(slots, old, strict=True):
            setattr(m, name, o)


@contextlib.contextmanager
def _attr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class StreamedModel:
    """A decoder LLM whose weights are supplied block by block.

    All `*_params` arguments are {checkpoint tensor name: tensor} dicts for one block (what
    `blockmerge.io.stream.read_block` returns per model, or a merged version of it)."""

    def __init__(
        self,
        path: str | Path | Checkpoint,
        *,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
        cfg = AutoConfig.from_pretrained(self.ckpt.path)
        self.model_type = cfg.model_type
        with torch.device("meta"):
            try:
                self.skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
            except ValueError:  # the model declares it cannot (e.g. Gemma2 and sdpa)
                self.skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        self.skeleton.eval()
        self.config = self.skeleton.config
        self.device = torch.device(device)
        self.layout = ModuleLayout(self.skeleton, list(self.ckpt.tensors))  # renamed and fused as on load
        self.module_names = self.layout.names
        spec = arch_spec(self.skeleton, self.config.num_hidden_layers, set(self.module_names.values()))
        if spec is None:
            raise CheckpointError(f"{self.ckpt.path}: model type {self.model_type!r} is not supported by divmerge")
        self.spec = spec
        self.layers = _get(self.skeleton, spec.layers)
        self.num_layers = len(self.layers)
        self.rotary = None
        if spec.rotary is not None:
            meta_rot = _get(self.skeleton, spec.rotary)
            with torch.device(self.device):
                self.rotary = type(meta_rot)(config=self.config)
            self.rotary.eval()
        self._real_buffers()
        self.blocks: list[Block] = self.ckpt.blocks()
        self.block_names = [b.name for b in self.blocks]
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        names = set(self.ckpt.tensors)
        by_module = {m: k for k, m in self.module_names.items()}
        self.head_weight_name = by_module.get(f"{spec.head}.weight", f"{spec.head}.weight")
        self.head_bias_name = by_module.get(f"{spec.head}.bias", f"{spec.head}.bias")
        self.tied = self.head_weight_name not in names
        if self.tied and not getattr(self.config.get_text_config(), "tie_word_embeddings", False):
            raise CheckpointError(
                f"{self.ckpt.path}: no tensor {self.head_weight_name} and the head is not tied to the embeddings "
                f"(the checkpoint's tensor names are not the {self.model_type} modules' names)"
            )
        self.tokens_weight_name = by_module.get(f"{spec.tokens}.weight", f"{spec.tokens}.weight")
        if self.tokens_weight_name not in names:
            raise CheckpointError(f"{self.ckpt.path}: no tensor {self.tokens_weight_name}")
        expected = {f"layers.{i}" for i in range(self.num_layers)} | {"embed", "head"}
        if set(self.block_names) != expected:
            raise CheckpointError(
                f"{self.ckpt.path}: blocks {sorted(self.block_names)} do not match a {self.num_layers}-layer "
                f"{self.model_type} model (expected {sorted(expected)})"
            )

    def _real_buffers(self) -> None:
        """Give the skeleton's small buffers outside the layers (e.g. Gemma's embedding scale) their real
        values, by the model's own initialisation (they are not in checkpoints)."""
        skip = tuple(p + "." for p in (self.spec.layers, self.spec.rotary) if p)
        for name, module in self.skeleton.named_modules():
            if (name + ".").startswith(skip):
                continue
            meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
            if meta:
                for k in meta:
                    module._buffers[k] = torch.empty_like(module._buffers[k], device=self.device)
                self.skeleton._init_weights(module)

    # ---- names ---------------------------------------------------------------------------------
    def _local(self, params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """The parameters of module `prefix`, by their names in it (checkpoint tensors renamed, and per-expert
        tensors fused, as on load: blockmerge.learn.fused)."""
        p = prefix + "."
        mine = {k: v for k, v in params.items() if self.module_names.get(k, k).startswith(p)}
        return {k[len(p) :]: v for k, v in self.layout.to_modules(mine).items()}

    def embed_block(self) -> Block:
        return self.blocks[0]

    def head_block(self) -> Block:
        return self.blocks[-1]

    # ---- pieces ---------------------------------------------------------------------------------
    def embed(
        self,
        params: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings (the model's own, scales included). With `rows` (sorted unique token ids, see
        `token_rows`), the token embedding tensor in `params` holds only those rows: the embedding's
        memory and gradient stay small."""
        return self.embed_context(params, input_ids, position_ids, rows)[0]

    def embed_context(self, params, input_ids, position_ids, rows=None, cache=None, attention_mask=None):
        """(input embeddings, per-layer keyword arguments: masks, position embeddings) as the model's own
        forward makes them: its decoder (`model`, `transformer`) runs with the embed block's tensors and
        stand-ins for the layers that record what each layer is given (then stop it before the norm)."""
        calls: list = [None] * self.num_layers
        first: list = []
        outer = self.spec.layers.rpartition(".")[0]
        decoder = _get(self.skeleton, outer)
        tok = _get(self.skeleton, self.spec.tokens)
        pad = tok.padding_idx
        if rows is not None:
            if pad is not None:
                hit = (rows == pad).nonzero()
                pad = int(hit[0, 0]) if len(hit) else None
            input_ids = torch.searchsorted(rows, input_ids.contiguous())
        records = torch.nn.ModuleList(_Record(calls, i, first, layer) for i, layer in enumerate(self.layers))
        swaps = [(self.spec.layers, records)]
        if self.rotary is not None:
            swaps.append((self.spec.rotary, self.rotary))
        local = self._local(params, outer)
        kwargs = {"position_ids": position_ids, "attention_mask": attention_mask, "use_cache": cache is not None}
        kwargs[cache_kwarg(decoder.forward)] = cache
        h = None
        with _swapped(self.skeleton, swaps), _attr(tok, "padding_idx", pad):
            try:
                functional_call(decoder, local, (), dict(input_ids=input_ids, **kwargs), strict=False)
            except _Stop as stop:
                h = stop.hidden
        if h is None:
            raise CheckpointError(f"{self.ckpt.path}: the {self.model_type} decoder did not reach its layers")
        return h, calls

    @staticmethod
    def token_rows(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.unique(input_ids)  # sorted

    def layer(self, i: int, params, h, *, position_ids, position_embeddings, masks, cache=None) -> torch.Tensor:
        """Decoder layer i; `masks`: the per-layer keyword arguments of `embed_context`."""
        prefix = f"{self.spec.layers}.{i}"
        kwargs = dict(masks[i])
        kwargs.update({cache_kwarg(self.layers[i].forward): cache, "use_cache": cache is not None})
        out = functional_call(self.layers[i], self._local(params, prefix), (h,), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return functional_call(_get(self.skeleton, self.spec.norm), self._local(params, self.spec.norm), (h,))

    def lm_head(self, params: dict[str, torch.Tensor], y: torch.Tensor, embed_params=None) -> torch.Tensor:
        """Logits from normed hidden states; `embed_params` supplies the tied weight."""
        local = self._local(params, self.spec.head)
        if self.tied:
            if embed_params is None:
                raise ValueError("tied lm_head needs the embed block's tensors")
            local = dict(local, weight=embed_params[self.tokens_weight_name])
        return self.final_logits(functional_call(_get(self.skeleton, self.spec.head), local, (y,)))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own transformation of the output projection [..., V] (soft-capping, logit scale):
        its *ForCausalLM forward run with stand-ins for the decoder (giving `logits` as hidden states)
        and for the head (the identity)."""
        decoder = self.spec.layers.rpartition(".")[0]
        x = logits.reshape(1, -1, logits.shape[-1])
        stub = _Constant(_decoder_output()(last_hidden_state=x))
        with _swapped(self.skeleton, [(decoder, stub), (self.spec.head, torch.nn.Identity())]):
            out = self.skeleton(input_ids=torch.zeros(1, x.shape[1], dtype=torch.long), logits_to_keep=0)
        return out.logits.reshape(logits.shape)

    def block_forward(self, block: Block, params, ids, pos, rows, h, pe, masks):
        """(h, position embeddings, masks) after the embedding block (which sets the position embeddings
        and masks, `rows` as in `embed`) or one decoder layer."""
        if block.name == "embed":
            h, ctx = self.embed_context(params, ids, pos, rows)
            return h, None, ctx
        return self.layer(block.layer, params, h, position_ids=pos, position_embeddings=pe, masks=masks), pe, masks

    def head_loss(self, params, head_weight, h, batch, objective: str, chunk: int, backward: bool):
        """Final norm + output projection `head_weight` + divergence at the batch's target positions of h
        [B, S, H] (blockmerge.learn.losses.chunked_head_loss): the loss and, with `backward`, dL/dh (the
        gradients of the leaves in `params` and `head_weight` accumulate in their .grad)."""
        dev = h.device
        rows, cols = batch.rows.to(dev), batch.cols.to(dev)
        hsel = h[rows, cols].detach().requires_grad_(backward)
        norm = lambda x: self.final_norm(params, x)
        bias = params.get(self.head_bias_name)
        loss = chunked_head_loss(hsel, batch.weights, batch.targets, objective, norm, head_weight, bias, chunk,
                                 backward, self.final_logits)  # fmt: skip
        if not backward:
            return loss, None
        dh = torch.zeros_like(h)
        dh.index_put_((rows, cols), hsel.grad, accumulate=True)
        return loss, dh

    # ---- whole passes -----------------------------------------------------------------------------
    def source(self, resident_max_bytes: int = 0, dtype: torch.dtype | None = None) -> BlockSource:
        return BlockSource([self.ckpt], device=self.device, resident_max_bytes=resident_max_bytes, dtype=dtype)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        source: BlockSource | None = None,
        dtype: torch.dtype = torch.float32,
        cache=None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] (or [B, V] with last_only) of the checkpoint's own weights, block by block.
        `attention_mask` [B, past + S]: 0 at (left) padding, then `position_ids` must be given."""
        source = source or self.source()
        input_ids = input_ids.to(self.device)
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=self.device)[None]
        h = pe = masks = None
        rows = self.token_rows(input_ids)
        # padding positions attend to nothing: eager attention (and some fused kernels) give NaN there, which
        # would reach real tokens through the cached keys and values (0 weight x NaN); they are zeroed
        pad = None if attention_mask is None else (attention_mask[:, -input_ids.shape[1] :] == 0)[..., None]
        if pad is not None and not bool(pad.any()):
            pad = None
        for block, tensors in source.stream(self.blocks):
            if block.name == "embed":
                params = {k: (v[rows] if k == self.tokens_weight_name else v).to(dtype) for k, v in tensors[0].items()}
                h, masks = self.embed_context(params, input_ids, position_ids, rows, cache, attention_mask)
                continue
            params = {k: v.to(dtype) for k, v in tensors[0].items()}
            if block.layer is not None:
                h = self.layer(
                    block.layer, params, h, position_ids=position_ids, position_embeddings=pe, masks=masks, cache=cache
                )
                if pad is not None:
                    h = h.masked_fill(pad, 0.0)
            else:
                if last_only:
                    h = h[:, -1]
                embed = None
                if self.tied:
                    embed = {k: v.to(dtype) for k, v in source.read(self.embed_block())[0].items()}
                return self.lm_head(params, self.final_norm(params, h), embed)
        raise CheckpointError(f"{self.ckpt.path}: no head block")
