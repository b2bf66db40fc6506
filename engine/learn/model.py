"""Streamed forward of a decoder LLM straight from its checkpoint, one block at a time.

The model is built once on the meta device from its config (transformers' own module classes, no
memory); each block is then run with `torch.func.functional_call`, its parameters supplied as plain
tensors read from the checkpoint (or merged from several checkpoints) just before use. Supported:
Llama-like families (llama, mistral, qwen2, and others with `model.embed_tokens / model.layers /
model.norm / lm_head / model.rotary_emb`) and GPT-2 (`transformer.wte / wpe / h / ln_f`, tied lm_head).

Block names follow `blockmerge.io.checkpoint`: 'embed', 'layers.{i}', 'head'. With tied embeddings the
head has no tensor of its own for the output projection: it reuses the embed block's token embedding."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from blockmerge.io.checkpoint import Block, Checkpoint, CheckpointError
from blockmerge.io.stream import BlockSource
from blockmerge.learn.losses import chunked_head_loss
from torch.func import functional_call


@dataclass(frozen=True)
class ArchSpec:
    tokens: str  # token embedding module
    positions: str | None  # learned position embedding module (GPT-2)
    layers: str  # ModuleList of decoder layers
    norm: str  # final norm
    head: str  # output projection
    rotary: str | None  # rotary embedding module, built for real


LLAMA_LIKE = ArchSpec("model.embed_tokens", None, "model.layers", "model.norm", "lm_head", "model.rotary_emb")
GPT2 = ArchSpec("transformer.wte", "transformer.wpe", "transformer.h", "transformer.ln_f", "lm_head", None)
ARCHS = {"llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gpt2": GPT2}


@functools.cache
def _cache_kwarg(fn) -> str:
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def cache_kwarg(fn) -> str:
    """The KV-cache keyword of a transformers layer or mask function: `cache` since transformers 5.24,
    `past_key_values` before (the old name warns until 5.40)."""
    return _cache_kwarg(getattr(fn, "__func__", fn))


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    return module.get_submodule(path)


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
            self.skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        self.skeleton.eval()
        self.config = self.skeleton.config
        self.device = torch.device(device)
        spec = ARCHS.get(self.model_type)
        if spec is None:
            names = dict(self.skeleton.named_modules())
            if all(p in names for p in ("model.embed_tokens", "model.layers", "model.norm", "lm_head")):
                spec = LLAMA_LIKE  # llama-like layout: try it
            else:
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
        self.blocks: list[Block] = self.ckpt.blocks()
        self.block_names = [b.name for b in self.blocks]
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        names = set(self.ckpt.tensors)
        self.head_weight_name = f"{spec.head}.weight"
        self.head_bias_name = f"{spec.head}.bias"
        self.tied = self.head_weight_name not in names
        self.tokens_weight_name = f"{spec.tokens}.weight"
        if self.tokens_weight_name not in names:
            raise CheckpointError(f"{self.ckpt.path}: no tensor {self.tokens_weight_name}")
        expected = {f"layers.{i}" for i in range(self.num_layers)} | {"embed", "head"}
        if set(self.block_names) != expected:
            raise CheckpointError(
                f"{self.ckpt.path}: blocks {sorted(self.block_names)} do not match a {self.num_layers}-layer "
                f"{self.model_type} model (expected {sorted(expected)})"
            )
        # attention type of each layer (sliding-window layers get their own mask)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is None:
            sliding = getattr(self.config, "sliding_window", None) is not None and self.model_type == "mistral"
            layer_types = ["sliding_attention" if sliding else "full_attention"] * self.num_layers
        self.layer_types = list(layer_types)

    # ---- names ---------------------------------------------------------------------------------
    def _local(self, params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in params.items() if k.startswith(p)}

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
        """Input embeddings. With `rows` (sorted unique token ids, see `token_rows`), the token embedding
        tensor in `params` holds only those rows: the embedding's memory and gradient stay small."""
        tok = _get(self.skeleton, self.spec.tokens)
        W = params[self.tokens_weight_name]
        pad = tok.padding_idx
        if rows is not None:
            if pad is not None:
                hit = (rows == pad).nonzero()
                pad = int(hit[0, 0]) if len(hit) else None
            input_ids = torch.searchsorted(rows, input_ids)
        h = F.embedding(input_ids, W, pad, tok.max_norm, tok.norm_type, tok.scale_grad_by_freq, tok.sparse)
        if self.spec.positions is not None:
            pos = _get(self.skeleton, self.spec.positions)
            h = h + functional_call(pos, self._local(params, self.spec.positions), (position_ids,))
        return h

    @staticmethod
    def token_rows(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.unique(input_ids)  # sorted

    def position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor):
        if self.rotary is None:
            return None
        with torch.no_grad():
            cos, sin = self.rotary(h, position_ids)
        return cos, sin

    def masks(self, h: torch.Tensor, position_ids: torch.Tensor, cache=None, attention_mask=None) -> dict[str, object]:
        """The model's own causal masks (None where the attention implementation is causal by itself).
        Learning batches are right-padded, so real positions never attend to padding and need no padding
        mask; generation left-pads and gives `attention_mask` [B, past + new] (1 = real token)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        out = {}
        for t in set(self.layer_types):
            fn = create_sliding_window_causal_mask if t == "sliding_attention" else create_causal_mask
            kw = {cache_kwarg(fn): cache}
            out[t] = fn(
                config=self.config, inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids, **kw
            )
        return out

    def layer(self, i: int, params, h, *, position_ids, position_embeddings, masks, cache=None) -> torch.Tensor:
        prefix = f"{self.spec.layers}.{i}"
        kwargs = {
            "attention_mask": masks[self.layer_types[i]],
            "position_ids": position_ids,
            cache_kwarg(self.layers[i].forward): cache,
            "use_cache": cache is not None,
        }
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
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
        return functional_call(_get(self.skeleton, self.spec.head), local, (y,))

    def block_forward(self, block: Block, params, ids, pos, rows, h, pe, masks):
        """(h, position embeddings, masks) after the embedding block (which sets the position embeddings
        and masks, `rows` as in `embed`) or one decoder layer."""
        if block.name == "embed":
            h = self.embed(params, ids, pos, rows)
            return h, self.position_embeddings(h, pos), self.masks(h, pos)
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
                                 backward)  # fmt: skip
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
                h = self.embed(params, input_ids, position_ids, rows)
                pe = self.position_embeddings(h, position_ids)
                masks = self.masks(h, position_ids, cache, attention_mask)
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
