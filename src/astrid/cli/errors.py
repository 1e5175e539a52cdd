"""Turning AstrID errors into a clean message and exit code on the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

import typer

from astrid.errors import AstridError

__all__ = ["EXIT_DATA_ERROR", "friendly_errors"]

#: Exit code for bad input data (a typed AstrID error), distinct from usage errors (2).
EXIT_DATA_ERROR = 3

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def _catch() -> Iterator[None]:
    try:
        yield
    except AstridError as exc:
        typer.secho(f"error: {type(exc).__name__}: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_DATA_ERROR) from exc


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command so typed AstrID errors print one line and exit with code 3."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _catch():
            return func(*args, **kwargs)

    return wrapper
