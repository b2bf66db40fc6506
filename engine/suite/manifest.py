"""The built-in suite's manifest (blockmerge.suite.build): a fingerprint of the weights, task-vector
statistics, the self-check a cached suite must pass, and the build's summary."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

SUITE_VERSION = "suite-v5"  # packed batches, unknown-tag training, tasks whose answer is never their input


def fingerprint(root: Path, tasks: Sequence[str]) -> str:
    """sha256 over the base's and the experts' model.safetensors."""
    h = hashlib.sha256()
    for d in [root / "base"] + [root / "experts" / t for t in tasks]:
        h.update((d / "model.safetensors").read_bytes())
    return h.hexdigest()


def task_vector_stats(base_dir: Path, expert_dirs: dict[str, Path]) -> dict:
    """Per expert: ||tau|| / ||theta0|| and the fraction of weights changed by more than 1% of their
    tensor's RMS; between experts: mean and largest cosine of the flattened task vectors."""
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    names = sorted(base)
    theta0 = torch.cat([base[n].flatten().double() for n in names])
    rms = torch.cat([torch.full((base[n].numel(),), base[n].double().pow(2).mean().sqrt().item()) for n in names])
    taus, out = {}, {"relative_norm": {}, "fraction_changed": {}}
    for t, d in expert_dirs.items():
        e = load_file(d / "model.safetensors")
        tau = torch.cat([e[n].flatten().double() for n in names]) - theta0
        taus[t] = tau
        out["relative_norm"][t] = round((tau.norm() / theta0.norm()).item(), 5)
        out["fraction_changed"][t] = round((tau.abs() > 0.01 * rms).double().mean().item(), 5)
    cos = [
        (taus[a] @ taus[b] / (taus[a].norm() * taus[b].norm())).item()
        for i, a in enumerate(taus)
        for b in list(taus)[i + 1 :]
    ]
    out["cosine_mean"] = round(sum(cos) / len(cos), 4) if cos else None
    out["cosine_max"] = round(max(cos), 4) if cos else None
    return out


def check_manifest(manifest: dict, config) -> str | None:
    """Why a manifest's suite cannot be used for `config` (None if it can)."""
    if manifest.get("version") != SUITE_VERSION or manifest.get("config") != config.as_dict():
        return "it was built with other settings"
    for t in config.tasks:
        e, b = manifest["expert_accuracy"].get(t, 0.0), manifest["base_accuracy"].get(t, 1.0)
        if e < config.target_acc:
            return f"expert {t} is at {e:.2f} test accuracy (< {config.target_acc})"
        if b > config.base_max_acc:
            return f"the base is at {b:.2f} on {t} (> {config.base_max_acc})"
    return None


def summary(manifest: dict) -> str:
    tv = manifest["task_vectors"]
    lines = [
        f"suite {manifest['version']} built in {manifest['build_seconds']:.0f}s, {manifest['build_cpu_seconds']:.0f} "
        f"CPU seconds (load average {manifest['load_average']} at the start); base: generic skills "
        f"{manifest['base_generic_accuracy']:.2f}",
        f"  {'task':<10} {'base':>5} {'expert':>6} {'steps':>5} {'|tau|/|theta0|':>14} {'changed':>8}",
    ]
    for t, a in manifest["expert_accuracy"].items():
        lines.append(
            f"  {t:<10} {manifest['base_accuracy'][t]:>5.2f} {a:>6.2f} {manifest['expert_steps'][t]:>5} "
            f"{tv['relative_norm'][t]:>14.4f} {tv['fraction_changed'][t]:>8.3f}"
        )
    if tv["cosine_mean"] is not None:
        lines.append(f"  cosine between task vectors: mean {tv['cosine_mean']:.3f}, largest {tv['cosine_max']:.3f}")
    return "\n".join(lines)
