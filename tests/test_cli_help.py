"""Every subcommand's help: one --weights text, and the default of every option that has one."""

from __future__ import annotations

import argparse

from fastfeat.cli import WEIGHTS_HELP, build_parser


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def _as_shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_weights_option_says_the_same_true_thing():
    found = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if "--weights" in action.option_strings:
                found.append(name)
                assert action.help.startswith(WEIGHTS_HELP), name
    assert {"extract", "serve", "profile"} <= set(found)
    assert "published name" in WEIGHTS_HELP and "random:SEED" in WEIGHTS_HELP


def test_every_option_with_a_default_shows_it():
    missing = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            shown = (action.help or "") % {"default": action.default}
            if action.default is not None and not ("default" in shown and _as_shown(action.default) in shown):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


def test_serve_exact_below_help_states_the_real_default():
    from fastfeat.serve.config import DEFAULT_EXACT_BELOW

    serve = dict(_subparsers(build_parser()))["serve"]
    (action,) = [a for a in serve._actions if "--exact-below" in a.option_strings]
    assert f"(default {DEFAULT_EXACT_BELOW})" in action.help
