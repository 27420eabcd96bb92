"""The `fetalplanes` command: one Typer app assembled from the command modules.

Each command module holds plain functions over the Python API; this module names them,
wraps them in the one-line error guard and adds them to the app.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fetalplanes._version import __version__
from fetalplanes.cli import (
    auditing,
    data,
    evaluation,
    network,
    prediction,
    scanning,
    serving,
    tools,
    training,
)
from fetalplanes.cli.common import guard

# Spinning OpenMP threads make torch several times slower on a busy 2-core machine;
# set before torch is imported (commands import it lazily). Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="fetalplanes",
    help="Classify 2D fetal ultrasound images into standard planes: train, evaluate, "
    "predict, sort, serve. Run `fetalplanes demo` to see the whole pipeline on synthetic data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are shown as written: `pip install 'x[ray]'` keeps [ray]
)
data_app = typer.Typer(help="Inspect labelled data sets.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")
pacs_app = typer.Typer(help="DICOMweb with a PACS: pull, push, classify a study in place.",
                       no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fetalplanes {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Classify 2D fetal ultrasound images into standard planes."""


COMMANDS = {
    "synth": data.synth,
    "models": tools.models_cmd,
    "train": training.train,
    "crossval": training.crossval,
    "tune": training.tune,
    "evaluate": evaluation.evaluate,
    "predict": prediction.predict,
    "sort": prediction.sort_cmd,
    "explain": prediction.explain,
    "serve": serving.serve,
    "export": tools.export_cmd,
    "bench": tools.bench_cmd,
    "cache": tools.cache_cmd,
    "download": tools.download,
    "demo": tools.demo,
    "scan": scanning.scan,
    "deid": scanning.deid,
    "audit": auditing.audit,
    "listen": network.listen,
}

for _name, _fn in COMMANDS.items():
    app.command(_name)(guard(_fn))
data_app.command("check")(guard(data.data_check))
pacs_app.command("pull")(guard(network.pacs_pull))
pacs_app.command("push")(guard(network.pacs_push))
pacs_app.command("classify")(guard(network.pacs_classify))
