"""`tokenizer_source: base | union | <model>`: merge models whose vocabularies differ (added tokens).

The output vocabulary is the base's (`base`), the union of every merged model's (`union`: the base's ids
first, then each new token in model order [base, experts...], regular tokens before added tokens, each
model's by id), or one model's (a folder). Only the vocabulary tensors (the embedding and the head: the
2-D tensors of the embed/head blocks whose rows are the vocabulary) change: each model's rows are reindexed
to the output vocabulary by token string before the method's tensor function runs, so every method works
unchanged. A token a model lacks (or whose id is past the model's rows) gets, as in mergekit:
  - the base's row when base_model is set and the base has the token;
  - otherwise the mean of the rows of the models that have it (the one model that has it: its row;
    no model: zeros).
Models lacking a token then take part in that row's merge like the others (same weights), so a token only
one expert has keeps that expert's row under any method that returns a shared row unchanged.
Output rows past the last token id (padding) take the mean of the token rows, per model."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from blockmerge.io.checkpoint import Checkpoint, block_name


@dataclass
class VocabPlan:
    names: set[str]  # the vocabulary tensors
    rows: int  # output vocabulary rows
    index: list[torch.Tensor]  # per model [base, experts...]: its row of each output row, -1 when missing
    base_pos: int | None  # position of base_model among the models (its rows win for missing tokens)
    tokenizer_files: dict[str, dict] = field(default_factory=dict)  # output tokenizer (json files)
    has_token: torch.Tensor | None = None  # output rows that hold a token (the others are padding)


def vocab_rows(ckpt: Checkpoint) -> int | None:
    """Rows of the checkpoint's vocabulary: its config's vocab_size, else the embedding's rows."""
    v = ckpt.config.get("vocab_size") or (ckpt.config.get("text_config") or {}).get("vocab_size")
    if v:
        return int(v)
    emb = [n for n in ckpt.tensors if block_name(n) == "embed" and len(ckpt.tensors[n].shape) == 2]
    return ckpt.tensors[emb[0]].shape[0] if emb else None


def vocab_tensors(ckpt: Checkpoint) -> set[str]:
    rows = vocab_rows(ckpt)
    return {
        n
        for n, info in ckpt.tensors.items()
        if block_name(n) in ("embed", "head") and len(info.shape) == 2 and info.shape[0] == rows
    }


def vocab_mismatch(base: Checkpoint, experts: list[Checkpoint]) -> str | None:
    """The one-line error for experts whose vocabulary tensors have other rows than the base's, or None."""
    for ex in experts:
        for name in sorted(vocab_tensors(base)):
            other = ex.tensors.get(name)
            if other is not None and other.shape != base.tensors[name].shape:
                return (
                    f"{ex.path}: tensor {name} has {other.shape[0]} rows, base has {base.tensors[name].shape[0]} "
                    "(a different vocabulary); set `tokenizer_source: union` (or base) in the config"
                )
    return None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: no usable tokenizer for tokenizer_source ({msg})") from None


def _union_tokenizer(base_tok, toks: list):
    """The base's tokenizer with every other model's new tokens added (regular ones, then added ones)."""
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's tokenizer object stays as it is
        base_tok.save_pretrained(d)
        out = load_tokenizer(Path(d))
    known = set(out.get_vocab())
    regular, added = [], {}
    for tok in toks:
        special = tok.added_tokens_decoder
        for s, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if s in known:
                continue
            is_added = any(a.content == s for a in special.values())
            if is_added:
                added.setdefault(s, next(a for a in special.values() if a.content == s))
            elif s not in regular:
                regular.append(s)
    if regular:
        out.add_tokens(regular)
    for a in added.values():
        out.add_tokens([a], special_tokens=a.special)
    return out


def _tokenizer_json(tok) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: json.loads(p.read_text()) for p in Path(d).glob("*.json")}


def _index(out_vocab: dict[str, int], vocab: dict[str, int], rows_out: int, rows_in: int) -> torch.Tensor:
    idx = torch.full((rows_out,), -1, dtype=torch.long)
    for s, i in out_vocab.items():
        j = vocab.get(s)
        if j is not None and j < rows_in and i < rows_out:
            idx[i] = j
    return idx


def plan_vocab(
    source: str | None, base: Checkpoint, experts: list[Checkpoint], source_path: Path | None, base_pos: int | None
) -> VocabPlan | None:
    """What the output vocabulary is and where each model's rows go; None when nothing is reindexed
    (tokenizer_source unset or `base`, and every model has the base's vocabulary rows)."""
    names = vocab_tensors(base)
    mismatch = vocab_mismatch(base, experts)
    if source is None and mismatch:
        raise ValueError(mismatch)
    if source in (None, "base") and not mismatch:
        return None
    models = [base, *experts]
    toks = [load_tokenizer(m.path) for m in models]
    rows_in = [m.tensors[sorted(names)[0]].shape[0] for m in models]
    files: dict[str, dict] = {}
    if source == "base":
        out_tok, rows = toks[0], rows_in[0]
    elif source == "union":
        out_tok = _union_tokenizer(toks[0], toks)
        files = _tokenizer_json(out_tok)
        rows = max(rows_in[0], len(out_tok))
    else:
        out_tok = load_tokenizer(source_path)
        files = _tokenizer_json(out_tok)
        same = [r for m, r in zip(models, rows_in, strict=True) if m.path == source_path]
        rows = same[0] if same else max(len(out_tok), max(out_tok.get_vocab().values()) + 1)
    out_vocab = out_tok.get_vocab()
    index = [_index(out_vocab, t.get_vocab(), rows, r) for t, r in zip(toks, rows_in, strict=True)]
    has_token = torch.zeros(rows, dtype=torch.bool)
    has_token[[i for i in out_vocab.values() if i < rows]] = True
    return VocabPlan(names, rows, index, base_pos, files, has_token)


def reindex(plan: VocabPlan, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each model's vocabulary rows in the output's order, missing tokens filled as the module says."""
    present = torch.stack([i >= 0 for i in plan.index]).to(tensors[0].device)  # [models, rows]
    gathered = [t[i.clamp(min=0).to(t.device)].float() for t, i in zip(tensors, plan.index, strict=True)]
    mask = present.unsqueeze(-1).float()
    total = sum(g * m for g, m in zip(gathered, mask, strict=True))
    default = total / present.sum(0).clamp(min=1).unsqueeze(-1)
    if plan.base_pos is not None:
        bp = present[plan.base_pos].unsqueeze(-1)
        default = torch.where(bp, gathered[plan.base_pos], default)
    out = []
    pad = ~plan.has_token.to(tensors[0].device)
    for g, p in zip(gathered, present, strict=True):
        rows = torch.where(p.unsqueeze(-1), g, default)
        if pad.any():
            rows[pad] = rows[~pad].mean(0)
        out.append(rows.to(tensors[0].dtype))
    return out
