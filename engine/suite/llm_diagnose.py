"""Diagnostics of the learned merges on the real-LLM suite (blockmerge.suite.llm): teacher-forced JS by
position kind, an in-memory merge, and the task-level coefficient search against which DivMerge's
coefficients are compared."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from blockmerge.suite.llm import LlmSuite, accuracy, left_padded, load_causal_lm


@torch.no_grad()
def teacher_forced_js(merged, expert, suite: LlmSuite, prompts: Sequence[str], max_new_tokens: int,
                      batch_size: int = 64) -> dict:  # fmt: skip
    """JS(expert || merged) at each position of the expert's greedy continuation, teacher-forced, split by
    kind: the first answer token, later answer tokens, and the EOS position. Also the expert's probability
    of its own first token (its confidence). Means over prompts."""
    device = next(merged.parameters()).device
    conts = [[*suite.encode_prompt(p)] for p in prompts]
    gen = greedy_token_ids(expert, suite, prompts, max_new_tokens, batch_size)
    sums = {"first": [0.0, 0], "rest": [0.0, 0], "eos": [0.0, 0]}
    conf = []
    for s in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for i in range(s, min(s + batch_size, len(prompts))):
            g = gen[i] + ([suite.eos_token_id] if len(gen[i]) < max_new_tokens else [])
            seqs.append(conts[i] + g[:-1] if g else conts[i])
            spans.append((len(conts[i]) - 1, g))
        ids, mask = left_padded(seqs, suite.pad_token_id, device)
        lp = torch.log_softmax(expert(input_ids=ids, attention_mask=mask).logits.float(), -1)
        lq = torch.log_softmax(merged(input_ids=ids, attention_mask=mask).logits.float(), -1)
        S = ids.shape[1]
        for b, (start, g) in enumerate(spans):
            off = S - len(seqs[b])
            for j, tok in enumerate(g):
                pos = off + start + j
                p, q = lp[b, pos].exp(), lq[b, pos].exp()
                m = 0.5 * (p + q)
                js = 0.5 * float((p * (lp[b, pos] - m.log())).sum() + (q * (lq[b, pos] - m.log())).sum())
                kind = "eos" if tok == suite.eos_token_id else ("first" if j == 0 else "rest")
                sums[kind][0] += js
                sums[kind][1] += 1
                if j == 0:
                    conf.append(float(p[tok]))
    out = {f"js_{k}": (v[0] / v[1] if v[1] else float("nan")) for k, v in sums.items()}
    out["n_positions"] = {k: v[1] for k, v in sums.items()}
    out["expert_confidence"] = sum(conf) / max(1, len(conf))
    return out


@torch.no_grad()
def greedy_token_ids(model, suite: LlmSuite, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
                     ) -> list[list[int]]:  # fmt: skip
    """Greedy continuation ids (EOS excluded) of each prompt."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=suite.eos_token_id,
                           pad_token_id=suite.pad_token_id)  # fmt: skip
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_padded([suite.encode_prompt(p) for p in prompts[s : s + batch_size]], suite.pad_token_id,
                                device)  # fmt: skip
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1] :]
        for row in gen.tolist():
            out.append(row[: row.index(suite.eos_token_id)] if suite.eos_token_id in row else row)
    return out


class InMemoryMerge:
    """theta0 + sum_t c_t tau_t set in place into one model on `device`, for fast searches over coefficients
    (task level: c [T]; layer level: c [T, n_blocks] in blockmerge.io.checkpoint's block order)."""

    def __init__(self, base: Path, experts: Sequence[Path], device: str = "cpu"):
        from blockmerge.io.checkpoint import Checkpoint, block_name

        self.model = load_causal_lm(base, device)
        self.names = [n for n, p in self.model.named_parameters()]
        self.theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.taus = []
        for e in experts:
            other = load_causal_lm(e, device)
            self.taus.append({n: p.detach() - self.theta0[n] for n, p in other.named_parameters()})
            del other
        blocks = [b.name for b in Checkpoint(base).blocks()]
        self.block_index = {b: i for i, b in enumerate(blocks)}
        self.block_of = {n: self.block_index[block_name(n)] for n in self.names}

    @torch.no_grad()
    def set(self, coefficients) -> None:
        c = torch.as_tensor(coefficients, dtype=torch.float32)
        for n, p in self.model.named_parameters():
            w = self.theta0[n].clone()
            for t, tau in enumerate(self.taus):
                w.add_(tau[n], alpha=float(c[t] if c.dim() == 1 else c[t, self.block_of[n]]))
            p.copy_(w)


def search_task_coefficients(merge: InMemoryMerge, suite: LlmSuite, subset: Sequence[str],
                             expert_acc: dict[str, float], grid: Sequence[float], split: str = "val",
                             batch_size: int = 64) -> list[tuple[tuple[float, ...], float, dict]]:  # fmt: skip
    """ANP on `split` of every task-level coefficient vector in grid^k, best first."""
    import itertools

    out = []
    for c in itertools.product(grid, repeat=len(subset)):
        merge.set(list(c))
        acc = {t: accuracy(merge.model, suite, t, split, batch_size) for t in subset}
        score = sum(acc[t] / expert_acc[t] if expert_acc[t] else 0.0 for t in subset) / len(subset)
        out.append((tuple(c), score, acc))
    return sorted(out, key=lambda r: -r[1])


def learned_coefficients(record: dict, merge: InMemoryMerge) -> torch.Tensor:
    """[T, n_blocks] coefficients of a LearnResult.to_json() record, in `merge`'s block order."""
    c = torch.zeros(len(record["coefficients"]), len(merge.block_index))
    for t, per_block in enumerate(record["coefficients"]):
        for name, v in per_block.items():
            c[t, merge.block_index[name]] = v
    return c


def diagnose_pair(suite: LlmSuite, subset: Sequence[str], records: dict[str, dict], expert_val: dict[str, float],
                  device: str, grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25), n_prompts: int = 64,
                  batch_size: int = 256) -> dict:  # fmt: skip
    """Issue 10 item 3 on one subset: the best task-level coefficients by grid search on the validation split,
    each learned merge's coefficients (per task: mean, min, max over blocks), its validation ANP, and the
    teacher-forced JS to each expert split by position kind (first answer token, later tokens, EOS), beside
    the same for the searched optimum and plain task arithmetic (all ones)."""
    merge = InMemoryMerge(suite.base, [suite.expert(t) for t in subset], device)
    search = search_task_coefficients(merge, suite, subset, expert_val, grid, "val", batch_size)
    experts = {t: load_causal_lm(suite.expert(t), device) for t in subset}
    prompts = {t: suite.unlabeled(t, n_prompts) for t in subset}

    def probe(coeffs) -> dict:
        merge.set(coeffs)
        acc = {t: accuracy(merge.model, suite, t, "val", batch_size) for t in subset}
        js = {t: teacher_forced_js(merge.model, experts[t], suite, prompts[t], suite.max_new_tokens(t), batch_size)
              for t in subset}  # fmt: skip
        return {"val_acc": acc, "val_anp": sum(acc[t] / max(expert_val[t], 1e-9) for t in subset) / len(subset),
                "js": js}  # fmt: skip

    T = len(subset)
    out = {"subset": list(subset), "grid": list(grid),
           "search_top": [{"coefficients": list(c), "val_anp": s, "val_acc": a} for c, s, a in search[:5]],
           "search_best": probe(list(search[0][0])), "task_arithmetic_1": probe([1.0] * T), "learned": {}}  # fmt: skip
    for method, rec in records.items():
        c = learned_coefficients(rec, merge)
        tail = rec["losses"][-10:]
        out["learned"][method] = {
            "coef_mean": c.mean(1).tolist(), "coef_min": c.min(1).values.tolist(), "coef_max": c.max(1).values.tolist(),
            "loss_first": rec["losses"][0], "loss_last": sum(tail) / len(tail), "losses": rec["losses"],
            **probe(c),
        }  # fmt: skip
    return out
