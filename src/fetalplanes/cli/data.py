"""Data commands: synth (phantoms) and data check."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.cli.options import LabelsOpt, PresetOpt


class SynthFormat(str, Enum):
    seed = "seed"
    fpdb = "fpdb"
    folders = "folders"




def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be new or empty).")],
    per_class: Annotated[int, typer.Option("--per-class", help="Images per plane.")] = 50,
    fmt: Annotated[
        SynthFormat, typer.Option("--format", help="Layout to write.")
    ] = SynthFormat.seed,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    preset: PresetOpt = "seed4",
) -> None:
    """Generate a SYNTHETIC labelled data set of ultrasound-like phantoms (tests, demos)."""
    from fetalplanes.data.datasets import PLANES
    from fetalplanes.data.synth import generate

    planes = PLANES if preset == "fpdb6" else PLANES[:4]
    s = generate(out, per_class=per_class, fmt=fmt.value, seed=seed, planes=planes)
    typer.echo(
        f"wrote {s.n_images} synthetic images of {s.n_patients} synthetic patients "
        f"to {s.out} ({s.format} layout)"
    )


def data_check(
    data: Annotated[Path, typer.Argument(help="Data folder.")],
    labels: LabelsOpt = None,
    preset: PresetOpt = "seed4",
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Images per class and split, patients, and missing/unreadable/duplicate files."""
    from fetalplanes.data.checks import check_dataset
    from fetalplanes.data.datasets import load_dataset

    report = check_dataset(load_dataset(data, labels, preset), seed=seed, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_check(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_check(report: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    d, con = report.data, Console(soft_wrap=True)
    con.print(
        f"{d.root}: layout {d.layout}, labels {d.labels_file or '(folders)'}, preset {d.preset}"
    )
    con.print(f"{len(d.samples)} images of {len(d.patients)} patients")
    t = Table("class", "train", "val", "test", "total")
    for c in d.classes:
        n = [report.counts[s][c] for s in ("train", "val", "test")]
        t.add_row(c, *map(str, n), str(sum(n)))
    t.add_row(
        "patients",
        *(str(len(report.split.of(s))) for s in ("train", "val", "test")),
        str(len(d.patients)),
    )
    con.print(t)
    for s in ("train", "val", "test"):
        missing = [c for c in d.classes if report.counts[s][c] == 0]
        if missing and any(report.counts[s].values()):
            con.print(f"[yellow]warning:[/yellow] the {s} split has no images of "
                      f"{escape(', '.join(missing))}")
    for key, counts in report.groups.items():
        con.print(f"images per {key}: " + ", ".join(f"{k} {n}" for k, n in counts.items()),
                  markup=False)
    problems = [
        ("dropped (planes outside the preset)", [f"{k}: {v}" for k, v in d.dropped.items()]),
        ("unknown labels", [f"{k}: {v}" for k, v in d.unknown.items()]),
        ("missing files", d.missing),
        ("duplicate rows", d.duplicate_rows),
        ("unreadable files", report.unreadable),
        ("identical files", [" = ".join(g) for g in report.duplicate_files]),
        ("cannot give an honest model", report.design_problems),
    ]
    for title, items in problems:
        if items:
            con.print(f"[yellow]{title} ({len(items)}):[/yellow]")
            for it in items[:50]:
                con.print(f"  {it}", markup=False)
            if len(items) > 50:
                con.print(f"  ... and {len(items) - 50} more")
    con.print(
        "[green]no problems found[/green]" if report.ok else "[yellow]problems found[/yellow]"
    )


