"""The guard in front of divmerge: before any learning or teacher pass, the streamed forward
(blockmerge.learn.model.StreamedModel) is checked against transformers' own *ForCausalLM on a shrunken
copy of the user's config (same class, 2 layers, small widths and vocabulary, sliding windows shorter
than the check's sequence, random weights from a fixed seed, fp32). An architecture whose streamed logits
differ, or whose streamed path fails, is refused with one line naming it: divmerge never learns against
wrong logits. Static merges never run the model and need no guard."""

from __future__ import annotations

import copy
import json
import tempfile

import torch

SEQ = 12  # check sequence length; sliding windows are set below it
WINDOW = 4
RTOL = 1e-4
_checked: dict[str, str | None] = {}  # config (JSON) -> refusal message, or None when exact


def shrunk_config(config):
    """A 2-layer, narrow copy of `config` (same class and options)."""
    small = copy.deepcopy(config)
    heads = 4
    kv = getattr(config, "num_key_value_heads", None)
    sizes = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=heads, vocab_size=61)
    if kv is not None:
        sizes["num_key_value_heads"] = 2 if kv < config.num_attention_heads else heads
    if getattr(config, "intermediate_size", None) is not None:
        sizes["intermediate_size"] = 48
    if getattr(config, "n_inner", None) is not None:
        sizes["n_inner"] = 48
    if getattr(config, "head_dim", None) is not None:
        sizes["head_dim"] = 8
    for moe in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(config, moe, None) is not None:
            sizes[moe] = 24
    for n in ("num_local_experts", "num_experts"):
        if getattr(config, n, None):
            sizes[n] = 4
    if getattr(config, "num_experts_per_tok", None):
        sizes["num_experts_per_tok"] = min(2, config.num_experts_per_tok)
    if getattr(config, "sliding_window", None) is not None:
        sizes["sliding_window"] = WINDOW
    types = getattr(config, "layer_types", None)
    if types is not None:
        present = list(dict.fromkeys(types))
        sizes["layer_types"] = (present * 2)[:2]
    for k, v in sizes.items():
        if not isinstance(getattr(type(small), k, None), property):  # derived (Falcon's head_dim)
            setattr(small, k, v)
    for special in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(small, special, None)
        if isinstance(v, int) and v >= small.vocab_size:
            setattr(small, special, 0)
    return small


def open_checked(path, *, attn_implementation: str = "sdpa", device="cpu"):
    """The StreamedModel of checkpoint `path` (blockmerge.learn.model), once its architecture passed
    `check_streamed`: what every learner and teacher pass opens."""
    from blockmerge.learn.model import StreamedModel

    model = StreamedModel(path, attn_implementation=attn_implementation, device=device)
    check_streamed(model.config, attn_implementation)
    return model


def check_streamed(config, attn_implementation: str = "sdpa") -> None:
    """Raise ValueError (one line, naming the architecture) unless the streamed forward of a shrunken
    `config` equals transformers' own model's logits; the verdict is cached per config in the process."""
    fields = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # experts share a verdict
    key = f"{attn_implementation}:{json.dumps(fields, sort_keys=True, default=str)}"
    if key not in _checked:
        _checked[key] = _verdict(config, attn_implementation)
    if _checked[key] is not None:
        raise ValueError(_checked[key])


def _verdict(config, attn_implementation: str) -> str | None:
    from blockmerge.learn.model import StreamedModel
    from transformers import AutoModelForCausalLM

    arch = config.model_type
    unsupported = "this architecture is not supported for divmerge yet"
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        try:
            small = shrunk_config(config)
            small.attn_implementation = "eager"
            ref = AutoModelForCausalLM.from_config(small).float().eval()
            # in a torch.distributed job save_pretrained writes on rank 0 only; this copy is each process's own
            ref.should_save_on_this_rank = lambda is_main_process: True
            _quietly(ref.save_pretrained, tmp)
        except Exception as e:  # noqa: BLE001 - the refusal names whatever went wrong
            why = f"{type(e).__name__}: {e}"
            return f"{arch}: cannot build a 2-layer copy to check the streamed forward ({why}); {unsupported}"
        name = type(ref).__name__
        ids = torch.randint(0, small.vocab_size, (2, SEQ))
        with torch.no_grad():
            want = ref(ids).logits.float()
        try:
            got = StreamedModel(tmp, attn_implementation=attn_implementation).forward(ids)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".replace(tmp, "<2-layer copy>")
            return f"{arch}: the streamed forward fails where transformers' {name} runs ({why}); {unsupported}"
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not diff <= RTOL * max(1.0, float(want.abs().max())):
        what = f"largest logit difference {diff:.3g}"
        return f"{arch}: the streamed forward differs from transformers' {name} ({what}); {unsupported}"
    return None


def _quietly(fn, *args):
    """`fn(*args)` without transformers' progress bars (the check is not the user's work)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if shown:
            logging.enable_progress_bar()
