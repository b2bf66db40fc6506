"""The built-in task suite: a tiny Llama base pretrained briefly on a mixture of the tasks' siblings
(related mappings under the same tags, see tasks.py: it knows the format and the computations but scores
~0 on the tasks), and one expert per task fully fine-tuned from it with a completion-only loss. Everything is a real
Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) in a cache folder, built
once, deterministically from a seed, on CPU in a few minutes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import default_cache
from .evaluate import accuracy
from .tasks import EOS_ID, PAD_ID, TASK_NAMES, VOCAB, CharTokenizer, TrainStream, eval_sets
from .writer import claim_output

SUITE_VERSION = "suite-v2"


@dataclass(frozen=True)
class SuiteConfig:
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASK_NAMES)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 192
    base_steps: int = 1000
    batch_size: int = 64
    base_lr: float = 3e-3
    # "siblings": the base learns each tag's sibling mapping (tasks.py), so it knows the format and the
    # computations but scores ~0 on the tasks; "tasks": it learns the tasks themselves (suite-v1)
    pretrain: str = "siblings"
    # experts: warm-up + cosine over `expert_steps`; validation accuracy checked every `check_every` steps,
    # stopping once it reached `target_acc` `patience` checks in a row (deterministic: fixed validation split)
    expert_steps: int = 1000
    expert_batch: int = 32
    expert_lr: float = 3e-4  # small: task vectors stay small relative to the base, as in real fine-tuning
    check_every: int = 25
    target_acc: float = 0.98
    patience: int = 2  # consecutive checks at target_acc before stopping
    n_test: int = 100
    n_val: int = 50

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]


DEFAULT = SuiteConfig()


@dataclass
class Suite:
    root: Path
    config: SuiteConfig
    manifest: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, task: str) -> Path:
        return self.root / "experts" / task

    @property
    def expert_accuracy(self) -> dict[str, float]:
        return dict(self.manifest["expert_accuracy"])

    @property
    def base_accuracy(self) -> dict[str, float]:
        return dict(self.manifest["base_accuracy"])

    def eval_sets(self, task: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        return eval_sets(task, self.config.n_test, self.config.n_val, self.config.seed)


def suite_dir(config: SuiteConfig, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else default_cache()
    name = SUITE_VERSION if config == DEFAULT else f"{SUITE_VERSION}-{config.key()}"
    return root / name


def model_config(cfg: SuiteConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        torch_dtype="float32",
    )


def make_batch(pairs: list[tuple[str, str]], tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and completion-only labels (-100 on BOS, prompt and padding)."""
    rows, labels = [], []
    for p, a in pairs:
        pi = tok.encode(p, bos=True)
        ai = tok.encode(a, eos=True)
        rows.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def completion_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # right padding + causal attention: real positions never attend to padding, no mask needed
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def train(
    model,
    streams: list[TrainStream],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    log=None,
    cosine: bool = True,
    check=None,
    check_every: int = 0,
    patience: int = 1,
) -> int:
    """AdamW with linear warm-up then cosine decay (or constant lr); each batch draws its tasks uniformly
    from `streams`. With `check`, stop as soon as check(model) is true (tested every `check_every` steps).
    Returns the number of steps taken."""
    tok = CharTokenizer()
    rng = random.Random(f"batches/{seed}/{desc}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * (0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()) if cosine else 1.0)
        ),
    )
    model.train()
    loss_val = float("nan")
    hits = 0
    for step in range(steps):
        pairs = [streams[rng.randrange(len(streams))].next() for _ in range(batch_size)]
        ids, lab = make_batch(pairs, tok)
        loss = completion_loss(model, ids, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = 0.9 * loss_val + 0.1 * loss.item() if step else loss.item()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  {desc}: step {step + 1}/{steps} loss {loss_val:.3f}")
        if check is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            hits = hits + 1 if check(model) else 0
            if hits >= patience:
                return step + 1
            model.train()
    model.eval()
    return steps


def _save(model, folder: Path, tok: CharTokenizer) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_hf(folder)


def build_suite(
    cache: str | Path | None = None,
    config: SuiteConfig = DEFAULT,
    rebuild: bool = False,
    log=None,
    threads_arg: int = 1,
) -> Suite:
    """Return the cached suite for `config`, building it first if it is missing, stale or `rebuild`."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    root = suite_dir(config, cache)
    if not rebuild and (suite := _cached(root, config)) is not None:
        return suite
    # one builder at a time (writer.OutputClaim): a second process waits, then finds the suite built
    with claim_output(root, force=True, wait=True) as claim:
        if not rebuild and (suite := _cached(root, config)) is not None:
            return suite
        if (root / "manifest.json").exists():
            log(f"suite at {root} does not match the requested configuration: rebuilding")
        return _build(root, config, rebuild, log, threads_arg, claim)


def _cached(root: Path, config: SuiteConfig) -> Suite | None:
    """The suite in `root` if it is complete and was built for `config`."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("config") == dataclasses.asdict(config) | {"tasks": list(config.tasks)} and all(
        (root / "experts" / t / "model.safetensors").exists() for t in config.tasks
    ):
        return Suite(root, config, manifest)
    return None


def _build(root: Path, config: SuiteConfig, rebuild: bool, log, threads_arg: int, claim) -> Suite:
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(threads_arg)  # tiny matmuls: 1 thread is fastest, and robust on shared cores
    # Models are written into a partial folder named after the configuration, each with a marker once
    # complete, so an interrupted build resumes where it stopped; the folder is renamed when all is done.
    part = root.parent / f".{root.name}.partial-{config.key()}"
    if rebuild and part.exists():
        shutil.rmtree(part)
    part.mkdir(exist_ok=True)
    for tmp in [*part.glob(".tmp-*"), *part.glob("experts/.tmp-*")]:  # models a killed build was saving
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = CharTokenizer()
        sets = {t: eval_sets(t, config.n_test, config.n_val, config.seed) for t in config.tasks}
        held = {t: {p for p, _ in te} | {p for p, _ in va} for t, (te, va) in sets.items()}
        log(f"building the task suite in {root} ({len(config.tasks)} tasks, seed {config.seed})")

        def done(folder: Path) -> dict | None:
            marker = folder / "blockmerge_suite.json"
            return json.loads(marker.read_text()) if marker.exists() else None

        def finish(model, folder: Path, info: dict) -> None:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
            _save(model, tmp, tok)
            (tmp / "blockmerge_suite.json").write_text(json.dumps(info))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)

        info = done(part / "base")
        if info is None:
            torch.manual_seed(config.seed)
            base = AutoModelForCausalLM.from_config(model_config(config), attn_implementation="eager")
            if config.pretrain not in ("siblings", "tasks"):
                raise ValueError(f"pretrain={config.pretrain!r}: expected 'siblings' or 'tasks'")
            sib = config.pretrain == "siblings"
            mixture = [TrainStream(t, config.seed, held[t], sibling=sib) for t in config.tasks]
            train(base, mixture, config.base_steps, config.base_lr, config.batch_size, config.seed, "base", log)
            acc = {t: accuracy(base, sets[t][0], tok) for t in config.tasks}
            info = {"accuracy": acc, "steps": config.base_steps}
            finish(base, part / "base", info)
        base_acc = info["accuracy"]
        log(f"  base accuracy: {_fmt(base_acc)} ({time.perf_counter() - started:.0f}s)")
        (part / "experts").mkdir(exist_ok=True)
        expert_acc, expert_steps = {}, {}
        for i, t in enumerate(config.tasks):
            info = done(part / "experts" / t)
            if info is None:
                torch.manual_seed(config.seed * 1000 + i + 1)
                model = AutoModelForCausalLM.from_pretrained(part / "base", dtype=torch.float32)
                stream = [TrainStream(t, config.seed + 1, held[t])]
                val = sets[t][1]
                check = lambda m, val=val: accuracy(m, val, tok) >= config.target_acc
                steps = train(
                    model,
                    stream,
                    config.expert_steps,
                    config.expert_lr,
                    config.expert_batch,
                    config.seed,
                    t,
                    None,
                    check=check,
                    check_every=config.check_every,
                    patience=config.patience,
                )
                info = {"accuracy": accuracy(model, sets[t][0], tok), "steps": steps}
                finish(model, part / "experts" / t, info)
            expert_acc[t], expert_steps[t] = info["accuracy"], info["steps"]
            secs = time.perf_counter() - started
            log(f"  expert {t}: accuracy {expert_acc[t]:.2f} after {expert_steps[t]} steps ({secs:.0f}s)")
        manifest = {
            "version": SUITE_VERSION,
            "config": dataclasses.asdict(config) | {"tasks": list(config.tasks)},
            "base_accuracy": base_acc,
            "expert_accuracy": expert_acc,
            "expert_steps": expert_steps,
            "build_seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
        }
        (part / "manifest.json").write_text(json.dumps(manifest, indent=2))
        claim.commit(part)
    finally:
        torch.set_num_threads(threads)
    log(f"suite ready in {time.perf_counter() - started:.0f}s")
    return Suite(root, config, manifest)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t}={a:.2f}" for t, a in acc.items())
