"""Synthetic model families for tests and benchmarks: a base and experts = base + small random
task vectors, written as real (optionally sharded) Hugging Face checkpoints. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_LLAMA_LIKE = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

TINY = {
    "llama": dict(model_type="llama", **_LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", **_LLAMA_LIKE),
    "mistral": dict(model_type="mistral", sliding_window=None, **_LLAMA_LIKE),
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


# --------------------------------------------------------------------------------------------------
# Large synthetic Llama families for benchmarks, written tensor by tensor (never an nn.Module).

SYNTH1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
# "tiny" runs every benchmark end to end in seconds (tests/test_benchmarks.py): same code, toy sizes
# Llama-2-7B's shapes (6.74B parameters, 13.5 GB per model in bf16)
SYNTH7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
SHAPES = {
    "1b": SYNTH1B,
    "7b": SYNTH7B,
    "tiny": dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512),
}


def llama_tensor_specs(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM checkpoint, in block order."""
    kv = hidden // heads * kv_heads
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def _name_seed(seed: int, name: str, model: int) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + model) & 0x7FFFFFFF


def write_synthetic_llama(
    root: str | Path,
    n_experts: int = 3,
    hidden: int = 2048,
    layers: int = 22,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_size: str = "2GB",
    *,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
    tau_scale: float = 0.002,
    force: bool = False,
) -> tuple[Path, list[Path]]:
    """Write root/base and root/expert{i} (Llama-shaped, random weights, experts = base + N(0, tau_scale)),
    one tensor at a time with CheckpointWriter, plus a config.json that transformers loads.
    The defaults give the ~1.1B-parameter model of the benchmarks (2.2 GB per model in bf16)."""
    from blockmerge.io.writer import CheckpointWriter
    from transformers import LlamaConfig

    root = Path(root)
    specs = llama_tensor_specs(hidden, intermediate, layers, heads, kv_heads, vocab)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = ["LlamaForCausalLM"]
    dname = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    for key in ("torch_dtype", "dtype"):
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = dname
    plan = [(n, s, dtype) for n, s in specs]
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(n_experts)]
    writers = [CheckpointWriter(d, plan, shard_size=shard_size, force=force) for d in dirs]
    try:
        for name, shape in specs:
            g = torch.Generator().manual_seed(_name_seed(seed, name, 0))
            if len(shape) == 1:  # norms: around 1
                base = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                base = torch.randn(shape, generator=g).mul_(0.02)
            base_q = base.to(dtype)
            writers[0].write(name, base_q)
            for i in range(n_experts):
                g = torch.Generator().manual_seed(_name_seed(seed, name, i + 1))
                writers[i + 1].write(name, base.add_(torch.randn(shape, generator=g), alpha=tau_scale).to(dtype))
                base.copy_(base_q)  # next expert starts again from the (rounded) base
            del base, base_q
        for w in writers:
            w.finish(extra_json={"config.json": cfg_dict})
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return dirs[0], dirs[1:]


def ensure_synthetic_llama(
    root: str | Path = "/tmp/synth1b", n_experts: int = 3, shape: str = "1b", **kw
) -> tuple[Path, list[Path]]:
    """A shared benchmark family (shape: a key of SHAPES): reuse root when root/DONE exists, else write it
    (under a lock, so concurrent callers wait for one writer) and record its shape and expert count in
    root/DONE. A family of another shape, or with fewer experts, is an error, never silently reused.
    Nothing here ever deletes it."""
    import fcntl
    import json

    if shape not in SHAPES:
        raise ValueError(f"synthetic family shape {shape!r}: expected one of {', '.join(SHAPES)}")
    root = Path(root)
    dirs = (root / "base", [root / f"expert{i}" for i in range(n_experts)])
    done = root / "DONE"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f".{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                # the smaller families are shared by every benchmark, whoever writes them first; 7b's 13.5 GB
                # per model fill the disk, so it gets exactly what was asked
                n = n_experts if shape == "7b" else max(n_experts, 3)
                write_synthetic_llama(root, n_experts=n, force=True, **SHAPES[shape], **kw)
                done.write_text(json.dumps({"shape": shape, "n_experts": n}))
    # an empty DONE predates the record: only the 1b family with 3 experts was written then
    have = json.loads(done.read_text() or '{"shape": "1b", "n_experts": 3}')
    if have["shape"] != shape or have["n_experts"] < n_experts:
        raise ValueError(
            f"{root}: holds a {have['shape']!r} family with {have['n_experts']} experts, asked for {shape!r} with "
            f"{n_experts}; pass another root or delete this one"
        )
    return dirs


# Tiny GGUF files, written with gguf's own GGUFWriter: a byte-level BPE vocabulary (every byte, a few
# merges, ChatML specials) and random weights in the GGUF layout, each tensor in the type `types` gives.
GGUF_TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)
GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _gguf_tensor_type(name: str, types: dict[str, str]) -> str:
    """The type for a tensor: the first `types` key found in its name, else types['default']."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return "F32"  # as llama.cpp writes them: 1-D tensors are never quantised
    return next((t for k, t in types.items() if k != "default" and k in name), types.get("default", "F32"))


def write_tiny_gguf(
    path: str | Path, arch: str = "llama", types: dict[str, str] | None = None, tied: bool = True, seed: int = 0
) -> Path:
    """A tiny `arch` ('llama' or 'qwen2') GGUF model at `path`; `types` maps a GGUF name part to a
    GGMLQuantizationType name (e.g. {'attn': 'Q8_0', 'ffn': 'Q4_0', 'default': 'F16'}). No output.weight
    when `tied`."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    s, types = GGUF_TINY, types or {"default": "F32"}
    head_dim = s["hidden"] // s["heads"]
    tokens = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in GGUF_MERGES), *GGUF_SPECIALS]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_block_count(s["layers"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (n_vocab - len(GGUF_SPECIALS)) + [3] * len(GGUF_SPECIALS))
    w.add_token_merges(GGUF_MERGES)
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 1)
    w.add_pad_token_id(n_vocab - 3)
    w.add_chat_template(GGUF_CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    hd, kv = s["hidden"], s["kv_heads"] * head_dim
    shapes = {"token_embd.weight": (n_vocab, hd), "output_norm.weight": (hd,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, hd)
    for i in range(s["layers"]):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hd,), b + "attn_q.weight": (hd, hd), b + "attn_k.weight": (kv, hd)}
        shapes |= {b + "attn_v.weight": (kv, hd), b + "attn_output.weight": (hd, hd), b + "ffn_norm.weight": (hd,)}
        shapes |= {b + "ffn_gate.weight": (s["ffn"], hd), b + "ffn_up.weight": (s["ffn"], hd)}
        shapes |= {b + "ffn_down.weight": (hd, s["ffn"])}
        if arch == "qwen2":
            shapes |= {b + "attn_q.bias": (hd,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
    for name, shape in shapes.items():
        x = rng.normal(0.0, 0.2, size=shape).astype(np.float32)
        if name.endswith("norm.weight"):
            x += 1.0
        qtype = gguf.GGMLQuantizationType[_gguf_tensor_type(name, types)]
        try:
            data = gguf.quants.quantize(x, qtype)
        except NotImplementedError:  # a type gguf cannot (de)quantise: bytes of the right size, for refusals
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
