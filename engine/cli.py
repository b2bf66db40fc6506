"""`blockmerge COMMAND ...`: each command lives in its own module with add_arguments(parser) and run(args);
only the chosen command's module is imported, so `blockmerge --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": ("blockmerge.demo", "build the built-in synthetic-task suite and compare merge methods"),
    "merge": (
        "blockmerge.merge",
        "static merge from a mergekit-style YAML (linear, task_arithmetic, ties, dare, slerp)",
    ),
    "divmerge": ("blockmerge.divmerge", "learn merge coefficients by Jensen-Shannon divergence to the experts"),
    "lora": ("blockmerge.lora", "merge LoRA adapters into an adapter or a base model, or learn their coefficients"),
    "import-gguf": ("blockmerge.gguf", "convert a GGUF model file into a safetensors Hugging Face checkpoint"),
}


KERNELS = ("auto", "compiled", "torch", "triton")  # BLOCKMERGE_KERNELS values (blockmerge.kernels.backend)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="blockmerge", description=__doc__.split(":")[0])
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default=None,
        help="task-vector kernels (sets BLOCKMERGE_KERNELS): auto = Triton on GPU, on CPU torch.compile'd for "
        "large tensors (about 4 s of start-up per process) and the eager reference for small ones; torch = "
        "always the eager reference (quicker for small linear merges)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.kernels:
        os.environ["BLOCKMERGE_KERNELS"] = args.kernels  # read by the one dispatch point at every call
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"blockmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
