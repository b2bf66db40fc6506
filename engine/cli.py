"""`blockmerge COMMAND ...`: each command lives in its own module with add_arguments(parser) and run(args);
only the chosen command's module is imported, so `blockmerge --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("blockmerge.demo", "build the built-in synthetic-task suite and compare merge methods"),
    "merge": (
        "blockmerge.merge",
        "static merge from a mergekit-style YAML (linear, task_arithmetic, ties, dare, slerp)",
    ),
    "divmerge": ("blockmerge.divmerge", "learn merge coefficients by Jensen-Shannon divergence to the experts"),
    "lora": ("blockmerge.lora", "merge LoRA adapters into an adapter or a base model, or learn their coefficients"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="blockmerge", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"blockmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
