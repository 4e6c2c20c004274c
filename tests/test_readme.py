"""The README's commands are real: every option of its synopsis is an option of that command,
every example command line parses, and its make targets exist."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from dissect.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _command_parser(words: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser of ``dissect <command> [<action>]``."""
    parser = _subparsers(build_parser())[words[0]]
    if words[0] == "dataset":
        parser = _subparsers(parser)[words[1]]
    return parser


def _synopsis() -> list[list[str]]:
    """The lines of the 'Command line' block, continuation lines joined to their command."""
    block = next(b for b in _blocks() if b.lstrip().startswith("dissect dataset toy"))
    commands: list[str] = []
    for line in block.splitlines():
        text = line.split("#")[0].rstrip()
        if text.startswith("dissect "):
            commands.append(text)
        elif text.strip():
            commands[-1] += " " + text.strip()
    return [c.split()[1:] for c in commands]


SYNOPSIS = _synopsis()


def test_the_synopsis_names_every_command() -> None:
    named = {words[0] for words in SYNOPSIS if not words[0].startswith("-")}
    assert named == set(_subparsers(build_parser()))


@pytest.mark.parametrize("words", [w for w in SYNOPSIS if not w[0].startswith("-")],
                         ids=lambda w: " ".join(w[:2]))
def test_every_synopsis_option_exists(words: list[str]) -> None:
    parser = _command_parser(words)
    known = {s for action in parser._actions for s in action.option_strings}
    given = set(re.findall(r"(--[a-z][a-z-]*)", " ".join(words)))
    assert given - known == set()


def _examples() -> list[list[str]]:
    """Every `dissect ...` command of the README's other code blocks, lines joined at ``\\``."""
    out = []
    for block in _blocks():
        if block.lstrip().startswith("dissect dataset toy"):
            continue
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("dissect "):
                out.append(shlex.split(line)[1:])
    return out


@pytest.mark.parametrize("words", _examples(), ids=lambda w: " ".join(w[:3]))
def test_every_example_command_parses(words: list[str]) -> None:
    build_parser().parse_args(words)


def test_the_make_targets_of_the_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make (\w+)`", README)) | {"demo", "test"}:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert README.startswith("# dissect\n\n```\nmake demo")
    assert ". .venv/bin/activate" in README.split("## ")[0]
