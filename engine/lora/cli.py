"""`blockmerge lora`: merge adapters into one adapter (merge), into the base (merge-into-base), learn their
coefficients (divmerge, blockmerge.lora.learn) and extract an adapter from a fine-tune (extract)."""

from __future__ import annotations

import argparse
import math
import time

from blockmerge.io.checkpoint import Checkpoint
from blockmerge.io.commit import claim_output
from blockmerge.io.dtypes import DTYPE_CHOICES, parse_device, parse_dtype
from blockmerge.lora.adapter import read_adapters, write_adapter
from blockmerge.lora.into_base import merge_into_base
from blockmerge.lora.merge import ADAPTER_METHODS, merge_adapters


def finite_float(x: str) -> float:
    """argparse type: a finite number."""
    try:
        v = float(x)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{x!r} is not a finite number (OUT goes first, or after --out)")
    return v


def _out_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """OUT is never guessed: the first positional argument, or --out (a list option takes every value after it)."""
    p.add_argument("out", metavar="OUT", nargs="?", help=f"{what} (or --out OUT)")
    p.add_argument("--out", "-o", dest="out_opt", metavar="OUT", default=None, help=f"{what}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    h = "merge adapters into one adapter (PEFT add_weighted_adapter semantics)"
    m = sub.add_parser("merge", help=h, description=h)
    _out_arguments(m, "output adapter folder")
    m.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter folders (same base)")
    m.add_argument("--method", default="svd", choices=ADAPTER_METHODS, help="PEFT combination type (default svd)")
    m.add_argument("--weights", nargs="+", type=finite_float, default=None, help="one per adapter (default 1)")
    m.add_argument("--density", type=finite_float, default=None, help="ties/dare/magnitude_prune: fraction kept")
    m.add_argument("--rank", type=int, default=None, help="svd methods: output rank (default: largest input r)")
    m.add_argument("--svd-clamp", type=finite_float, default=None, help="PEFT's svd_clamp quantile")
    m.add_argument("--svd-full-matrices", action="store_true", help="full SVD as PEFT's default (same result)")
    m.add_argument("--svd-driver", default=None, help="torch.linalg.svd driver on CUDA (gesvd, gesvdj, gesvda)")
    m.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                   help="ties: elect signs by summed magnitude (total) or by count (frequency)")  # fmt: skip
    m.add_argument("--seed", type=int, default=0, help="DARE masks")
    m.add_argument("--base", default=None, help="base checkpoint: check the adapters' shapes against it")
    m.add_argument("--dtype", default=None, help="output dtype (default: the first adapter's)")
    m.add_argument("--force", action="store_true", help="overwrite OUT")

    h = "W0 + sum_t w_t s_t B_t A_t as a full checkpoint, streamed block by block"
    b = sub.add_parser("merge-into-base", help=h, description=h)
    _out_arguments(b, "output checkpoint folder")
    b.add_argument("--base", required=True, metavar="DIR", help="base checkpoint the adapters were trained on")
    b.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter folders")
    b.add_argument("--weights", nargs="+", type=finite_float, default=None, help="one per adapter (default 1)")
    b.add_argument("--dtype", default=None, help="output dtype (default: the base's)")
    b.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB (default 5GB)")
    b.add_argument("--device", default=None, help="where tensors are combined: cpu (default) or cuda")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or final line")
    b.add_argument("--force", action="store_true", help="overwrite OUT")

    h = "extract a PEFT adapter approximating MODEL - BASE: a truncated SVD per linear module of the layers"
    e = sub.add_parser("extract", help=h, description=h)
    _out_arguments(e, "output adapter folder")
    e.add_argument("--base", required=True, metavar="DIR", help="base checkpoint the adapter will be loaded onto")
    e.add_argument("--model", required=True, metavar="DIR", help="fine-tuned checkpoint of the same architecture")
    e.add_argument("--rank", type=int, required=True, help="adapter rank r (each module keeps r singular values)")
    e.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="modules to adapt, e.g. q_proj v_proj (default: every linear module of the decoder "
                   "layers; embeddings, norms and the head are never adapted)")  # fmt: skip
    e.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="adapter dtype (default: the model's)")
    e.add_argument("--device", default=None, help="where the SVDs run: cpu (default) or cuda")
    e.add_argument("--svd-driver", default=None, choices=("gesvd", "gesvdj", "gesvda"),
                   help="torch.linalg.svd driver on CUDA (default: torch's choice)")  # fmt: skip
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--force", action="store_true", help="overwrite OUT")

    h = "learn per-adapter coefficients by JS divergence to base + adapter t (DivMerge)"
    d = sub.add_parser("divmerge", help=h, description=h)
    d.add_argument("config", metavar="CONFIG", help="YAML: base_model, adapters: [{adapter: DIR, data: FILE}], ...")
    d.add_argument("out", metavar="OUT", help="output folder (a checkpoint, or an adapter with --output adapter)")
    d.add_argument("--steps", type=int, default=None, help="learning steps (overrides the config's steps/epochs)")
    d.add_argument("--device", default=None, help="cpu or cuda (overrides the config)")
    d.add_argument(
        "--output",
        choices=("base", "adapter"),
        default=None,
        help="write the merged full checkpoint (base, default) or a cat adapter with the coefficients",
    )
    d.add_argument("--force", action="store_true", help="overwrite OUT")
    d.add_argument("--no-progress", action="store_true", help="no progress bars or final line")
    d.add_argument("--memory", default=None, help="base blocks kept resident on the device, e.g. 8GiB (overrides "
                   "the config; default: half of the free memory); what does not fit is streamed")  # fmt: skip


def _resolve_out(args: argparse.Namespace) -> None:
    if args.out is not None and args.out_opt is not None and args.out != args.out_opt:
        raise ValueError(f"OUT given twice ({args.out} and --out {args.out_opt})")
    args.out = args.out or args.out_opt
    if args.out is None:
        raise ValueError(
            "OUT is missing: give it first (before --adapters) or as --out OUT; --adapters and --weights take "
            "every value that follows them"
        )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.lora_command in ("merge", "merge-into-base", "extract"):
        _resolve_out(args)
    if args.lora_command == "merge":
        inputs = [*args.adapters, *([args.base] if args.base else [])]
        with claim_output(args.out, force=args.force, inputs=inputs):
            return _merge_cli(args, inputs, started)
    if args.lora_command == "merge-into-base":
        parse_device(args.device)
        with claim_output(args.out, force=args.force, inputs=[args.base, *args.adapters]):
            merge_into_base(
                args.base,
                args.adapters,
                args.weights,
                args.out,
                force=args.force,
                shard_size=args.shard_size,
                dtype=parse_dtype(args.dtype, "--dtype"),
                device=args.device,
                progress=not args.no_progress,
            )
        return 0
    if args.lora_command == "extract":
        with claim_output(args.out, force=args.force, inputs=[args.base, args.model]):
            return _extract_cli(args, started)
    if args.lora_command == "divmerge":
        from blockmerge.lora.learn import run_divmerge_cli

        return run_divmerge_cli(args)
    raise ValueError(f"unknown lora subcommand {args.lora_command!r}")


def _merge_cli(args: argparse.Namespace, inputs: list[str], started: float) -> int:
    from blockmerge.io.report import final_line

    base = Checkpoint(args.base) if args.base else None
    adapters, _ = read_adapters(args.adapters, base, base_given=args.base is not None)
    merged = merge_adapters(
        adapters,
        args.weights,
        args.method,
        density=args.density,
        rank=args.rank,
        svd_clamp=args.svd_clamp,
        svd_full_matrices=args.svd_full_matrices,
        svd_driver=args.svd_driver,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
        dtype=parse_dtype(args.dtype, "--dtype"),
    )
    info = {
        "adapters": list(map(str, args.adapters)),
        "weights": args.weights,
        "method": args.method,
        "density": args.density,
        "rank": merged.config["r"],
        "seed": args.seed,
    }
    out = write_adapter(merged, args.out, force=args.force, info=info, inputs=inputs)
    print(final_line(f"merged {len(adapters)} adapters ({args.method}, r={merged.config['r']}) into {out}", started))
    return 0


def _extract_cli(args: argparse.Namespace, started: float) -> int:
    from blockmerge.io.report import final_line
    from blockmerge.lora.extract import extract_adapter, report_json, report_table

    device = parse_device(args.device)
    if args.svd_driver and device.type != "cuda":
        raise ValueError(f"--svd-driver {args.svd_driver}: applies to CUDA only (add --device cuda)")
    extraction = extract_adapter(
        args.base,
        args.model,
        args.rank,
        target_modules=args.target_modules,
        dtype=parse_dtype(args.dtype, "--dtype"),
        device=device,
        svd_driver=args.svd_driver,
        progress=not args.no_progress,
    )
    print(report_table(extraction))
    info = report_json(extraction, args.base, args.model)
    out = write_adapter(extraction.adapter, args.out, force=args.force, info=info, inputs=[args.base, args.model])
    n = len(extraction.modules)
    print(final_line(f"extracted a rank-{args.rank} adapter of {n} modules into {out}", started))
    return 0
