"""Help texts of every ``astrid`` command render as written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from astrid.cli import app

runner = CliRunner()


def _commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _texts(command: Any) -> Iterator[tuple[str, str]]:
    if command.help:
        yield "docstring", command.help
    for param in command.params:
        text = getattr(param, "help", None)
        if text:
            yield param.name or "?", text


def test_help_texts_hold_no_rich_markup_brackets() -> None:
    # Typer renders help as Rich markup: "[default: x]" in a help text is taken for a
    # markup tag and silently dropped from the printed help.
    bad = [
        (" ".join(path), where, text)
        for path, command in _commands(typer.main.get_command(app), ())
        for where, text in _texts(command)
        if "[" in text
    ]
    assert not bad, bad


def test_train_help_shows_what_a_default_is() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "RealBogusConfig's" in result.output
    assert "the builder's, 2024" in result.output
