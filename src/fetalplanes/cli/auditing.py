"""`fetalplanes audit`: the mid-trimester exam checklist per study and across a department."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fetalplanes.cli.common import fail, printable
from fetalplanes.cli.options import (
    BackendChoice,
    BackendOpt,
    EveryOpt,
    FpsOpt,
    MinConfidenceOpt,
    QuietOpt,
    WeightsOpt,
    WorkersOpt,
    load_model,
    model_ref,
)
from fetalplanes.console import report_failures
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.model_ref import GRAMMAR

#: Default OUT is AUDITS_DIR/audit, then audit-1, audit-2 ...: never an existing folder.
AUDITS_DIR = Path("runs") / "audit"


class StudyBy(str, Enum):
    auto = "auto"
    folder = "folder"
    file = "file"
    one = "one"


def _out_folder(out: Path | None) -> Path:
    """--out (new or empty), else audits/audit[-N] that does not exist yet."""
    if out is not None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            fail(f"{out}: already exists and is not an empty folder; audit never "
                 "overwrites, choose another --out")
        return out
    for n in range(10_000):
        candidate = AUDITS_DIR / ("audit" if n == 0 else f"audit-{n}")
        if not candidate.exists():
            return candidate
    raise FetalPlanesError(f"{AUDITS_DIR}: too many audits; give --out")


def audit(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Images, DICOM files (stills or cines), videos, or folders of "
                            "them (searched recursively)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder, new or empty (default runs/audit/audit, -1, -2...)."),
    ] = None,
    checklist: Annotated[
        str,
        typer.Option(help="isuog-mid-trimester (default), seed4-planes, or a checklist "
                          "FILE.json."),
    ] = "isuog-mid-trimester",
    study_by: Annotated[
        StudyBy,
        typer.Option("--study-by", help="auto: DICOM by StudyInstanceUID, each video alone, "
                     "other images by the folder given; folder: each folder given is one "
                     "study; file: each file; one: everything is one study."),
    ] = StudyBy.auto,
    model: Annotated[
        str, typer.Option("--model", help=f"The model: {GRAMMAR}. Default: the bundled "
                                          "sononet16.")
    ] = "sononet16",
    weights: WeightsOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Fold a zero-shot model to this preset (default: the checklist's, "
                          "views13 for ISUOG)."),
    ] = None,
    backend: BackendOpt = BackendChoice.auto,
    every: EveryOpt = 1,
    window: Annotated[
        int, typer.Option(help="Frames in the centred smoothing window of recordings (odd).")
    ] = 5,
    fps: FpsOpt = None,
    min_confidence: MinConfidenceOpt = 0.5,
    salt_file: Annotated[
        Path | None,
        typer.Option("--salt-file", help="Secret salt for the operator/machine/site "
                     "pseudonyms (created if absent; keep it private and reuse it to compare "
                     "audits). Default: $FETALPLANES_AUDIT_SALT, else a new OUT/salt.txt."),
    ] = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Which standard views each study holds, the best frame of each, what is missing:
    OUT/<study>/checklist.json + report.html, and OUT/department.html/.json, studies.csv."""
    from fetalplanes.models.model_card import card_for
    from fetalplanes.workflows.audit import AuditOptions, run_audit
    from fetalplanes.workflows.checklist import load_checklist
    from fetalplanes.workflows.scan import check_options

    check_options(every, window)
    chosen = load_checklist(checklist)
    folder = _out_folder(out)
    predictor = load_model(model_ref(model, weights, preset or chosen.preset, backend,
                                      min_confidence=min_confidence))
    zero_shot = predictor.fold is not None
    card = {"name": model, "preset": predictor.card.preset if zero_shot else None,
            "classes": predictor.output_classes,
            "card": card_for(predictor.card, Path(model).name, zero_shot)}
    result = run_audit(inputs, folder, predictor, chosen, study_by=study_by.value,
                       options=AuditOptions(every=every, window=window, fps=fps,
                                            workers=workers),
                       salt_file=salt_file, model=card, progress=not quiet)
    if result.problems:
        report_failures(result.problems)
    for a in result.audits:
        r = a.result
        missing = ", ".join(r.missing) or "none"
        typer.echo(printable(f"{a.study.label}: {len(r.present)}/{r.assessed} views present; "
                             f"missing: {missing}"))
    s = result.summary
    typer.echo(f"{s['studies']} studies, {s['complete_studies']} complete; "
               f"{len(result.audits[0].result.not_assessed) if result.audits else 0} "
               f"checklist items not assessed by this model; {result.seconds:.1f} s")
    typer.echo(printable(f"reports: {folder}/<study>/report.html; summary: "
                         f"{folder / 'department.html'}"))
