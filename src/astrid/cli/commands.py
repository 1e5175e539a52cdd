"""Registration of every sub-command on the Typer application."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Attach every command module's command to ``app``."""
    from astrid.cli.inspect import inspect

    app.command("inspect")(inspect)

    from astrid.cli.simulate import simulate

    app.command("simulate")(simulate)

    from astrid.cli.align import align

    app.command("align")(align)

    from astrid.cli.alerts import alerts_info

    app.command("alerts-info")(alerts_info)

    from astrid.cli.subtract import subtract

    app.command("subtract")(subtract)

    from astrid.cli.ingest import ingest

    app.command("ingest")(ingest)

    from astrid.cli.process import process

    app.command("process")(process)

    from astrid.cli.status import status

    app.command("status")(status)

    from astrid.cli.candidates import candidates

    app.command("candidates")(candidates)

    from astrid.cli.demo import demo

    app.command("demo")(demo)

    from astrid.cli.inject import inject

    app.command("inject")(inject)

    from astrid.cli.models import evaluate, models_app, score_alerts, train

    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("score-alerts")(score_alerts)
    app.add_typer(models_app, name="models")
