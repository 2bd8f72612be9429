"""``docs/cli.md``: every command's ``--help``, generated from the parsers so the docs cannot drift.

    python -m fastfeat.cli_docs > docs/cli.md

``tests/test_docs.py`` regenerates the page in memory and fails, naming this command, when the
committed page differs. The help is formatted at a fixed width (``COLUMNS``), not the terminal's, so
the page is the same on every machine; argparse's layout differs a little between Python versions,
so the page records the version that wrote it and the test compares the text only on that version
(and the option names on every version).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .cli import build_parser

WIDTH = 110
REGENERATE = "python -m fastfeat.cli_docs > docs/cli.md"


@contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse sizes help to $COLUMNS (shutil.get_terminal_size reads it first)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, argparse.ArgumentParser]]:
    """(``fastfeat extract``, its parser), … for the top level and every (nested) subcommand, in order."""
    parser = parser or build_parser()
    out = [(parser.prog, parser)]
    for sub in _subparsers(parser).values():
        out.extend(commands(sub))
    return out


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string (``--batch-size``) and positional name (``source``) of one parser."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
        elif action.option_strings:
            names.update(action.option_strings)
        else:
            names.add(action.dest)
    return names


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def render() -> str:
    """The whole page: an index, then each command's ``--help`` verbatim in a code block."""
    pairs = commands()
    lines = [
        "# Command-line reference",
        "",
        f"Generated from the argparse parsers by `{REGENERATE}` (Python {python_version()}, {WIDTH} columns);",
        "do not edit by hand: `tests/test_docs.py` fails when this page and the parsers disagree.",
        "The same text is what `fastfeat COMMAND --help` prints.",
        "",
    ]
    lines += [f"* [`{prog}`](#{prog.replace(' ', '-')})" for prog, _ in pairs]
    with _columns(WIDTH):
        for prog, parser in pairs:
            lines += ["", f"## {prog}", "", "```text", parser.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
