"""The CLI explains itself: every command, subcommand and option has help text, and `merge --help` lists every
registered method (the help is derived from the registry, so it cannot fall behind it)."""

from __future__ import annotations

import argparse
import importlib

import pytest
from blockmerge import cli
from blockmerge.merge.registry import REGISTRY


def command_parser(name: str) -> argparse.ArgumentParser:
    module, help_ = cli.COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"blockmerge {name}", description=help_)
    importlib.import_module(module).add_arguments(p)
    return p


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help(name):
    leaves = list(cli._leaves(command_parser(name)))
    for leaf in leaves:
        assert leaf.description, f"{leaf.prog}: no description"
        for action in leaf._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{leaf.prog} {action.option_strings or action.dest}: no help text"


def test_merge_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert len(REGISTRY) >= 20
    for name, method in REGISTRY.items():
        assert name in text
        for param in (*method.tensor_params, *method.global_params):
            assert param.name in text, f"{name}: parameter {param.name} missing from merge --help"
