"""`blockmerge COMMAND ...`: each command lives in its own module with add_arguments(parser) and run(args);
only the chosen command's module is imported, so `blockmerge --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": ("blockmerge.suite.demo", "build the built-in synthetic-task suite and compare merge methods"),
    "merge": (
        "blockmerge.merge.run",
        "static merge from a mergekit-style YAML (20 methods: `blockmerge merge --help` lists them)",
    ),
    "divmerge": ("blockmerge.learn.cli", "learn merge coefficients by Jensen-Shannon divergence to the experts"),
    "lora": (
        "blockmerge.lora.cli",
        "merge LoRA adapters into an adapter or a base model, or learn their coefficients",
    ),
    "import-gguf": ("blockmerge.io.gguf", "convert a GGUF model file into a safetensors Hugging Face checkpoint"),
}


KERNELS = ("auto", "compiled", "eager", "torch", "triton")  # BLOCKMERGE_KERNELS values (blockmerge.kernels.backend)
# every command also takes these (before or after its own arguments)
COMMON = {
    "--debug": "show the traceback of an error (default: one line `blockmerge COMMAND: error: ...`)",
    "--allow-nonfinite": "accept NaN/Inf in input tensors (default: an error naming the model and tensor)",
}


def _leaves(p: argparse.ArgumentParser):
    """The parsers that take a command's final arguments (`lora merge`, not `lora`)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in a.choices.values():
            yield from _leaves(child)


def _message(e: BaseException) -> str:
    """One line: an OS error as 'FILE: reason', a bad input as its message; anything else keeps its type."""
    import torch

    if isinstance(e, OSError) and e.strerror:
        text = e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
    else:
        text = str(e).strip() or type(e).__name__
        if not isinstance(e, (ValueError, OSError, torch.linalg.LinAlgError)):  # not an expected failure
            text = f"{type(e).__name__}: {text} (--debug shows the traceback)"
    return " ".join(text.split())


def _exit_code(e: BaseException) -> int:
    """2: the input is wrong (fix the command or its files); 1: the run failed (disk, permissions, numerics)."""
    if isinstance(e, (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="blockmerge", description=__doc__.split(":")[0])
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default=None,
        help="task-vector kernels (sets BLOCKMERGE_KERNELS): auto = Triton on GPU, on CPU torch.compile'd for "
        "large tensors (about 4 s of start-up per process) and the eager reference for small ones; torch (or eager) = "
        "always the eager reference (quicker for small linear merges)",
    )
    for flag, help_ in COMMON.items():
        parser.add_argument(flag, action="store_true", help=help_)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
            for leaf in _leaves(p):
                for flag, h in COMMON.items():
                    leaf.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=h)
    args = parser.parse_args(argv)
    if args.kernels:
        os.environ["BLOCKMERGE_KERNELS"] = args.kernels  # read by the one dispatch point at every call
    debug = args.debug or os.environ.get("BLOCKMERGE_DEBUG", "") not in ("", "0")
    allow = os.environ.get("BLOCKMERGE_ALLOW_NONFINITE")
    if args.allow_nonfinite:
        os.environ["BLOCKMERGE_ALLOW_NONFINITE"] = "1"  # read where tensors are read (checkpoint.check_finite)
    try:
        return modules[args.command].run(args) or 0
    except KeyboardInterrupt:
        print(f"blockmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure: one line and an exit code; the traceback only with --debug
        if debug:
            raise
        print(f"blockmerge {args.command}: error: {_message(e)}", file=sys.stderr)
        return _exit_code(e)
    finally:
        if allow is None:
            os.environ.pop("BLOCKMERGE_ALLOW_NONFINITE", None)
        else:
            os.environ["BLOCKMERGE_ALLOW_NONFINITE"] = allow


if __name__ == "__main__":
    sys.exit(main())
