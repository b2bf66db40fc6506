"""`blockmerge divmerge CONFIG OUT`: learn merge coefficients of full experts (blockmerge.learn.full) and
write the merged checkpoint with divmerge.json."""

from __future__ import annotations

MEMORY_HELP = (
    "blocks of base and experts kept resident on the device, e.g. 8GiB (overrides the config; default: half "
    "of the free memory); what does not fit is streamed from disk"
)


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML: base_model, models: [{model, data}], level, objective, steps, ...")
    p.add_argument("out", help="output folder: merged checkpoint + divmerge.json")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--steps", type=int, default=None, help="learning steps (overrides the config)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or final line")
    p.add_argument("--memory", default=None, help=MEMORY_HELP)


def run(args) -> int:
    from blockmerge.learn.full import run_divmerge

    run_divmerge(args.config, args.out, force=args.force, steps=args.steps, device=args.device,
                 progress=not args.no_progress, memory=args.memory)  # fmt: skip
    return 0
