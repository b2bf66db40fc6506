"""Synthetic model families for tests and benchmarks: a base and experts = base + small random
task vectors, written as real (optionally sharded) Hugging Face checkpoints. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = {
    "llama": dict(
        model_type="llama",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_embd=48,
        n_layer=3,
        n_head=4,
        vocab_size=97,
        n_positions=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def tiny_config(arch: str = "llama", **overrides):
    kw = dict(TINY[arch])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg.attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def make_family(
    root: str | Path,
    arch: str = "llama",
    n_experts: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: str = "40KB",
    tau_scale: float = 0.02,
    **overrides,
) -> tuple[Path, list[Path]]:
    """Write root/base and root/expert{i}; each expert adds an independent random task vector."""
    root = Path(root)
    base = tiny_model(arch, seed, dtype, **overrides)
    base_dir = root / "base"
    base.save_pretrained(base_dir, max_shard_size=shard_size)
    experts = []
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        expert = tiny_model(arch, seed, dtype, **overrides)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * tau_scale)
        d = root / f"expert{i}"
        expert.save_pretrained(d, max_shard_size=shard_size)
        experts.append(d)
    return base_dir, experts
