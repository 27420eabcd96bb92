"""DICOM network commands: `listen` (a Storage SCP that classifies what it receives) and
`pacs pull|push|classify` (DICOMweb against a PACS)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from fetalplanes.cli.common import fail
from fetalplanes.cli.options import (
    BackendChoice,
    BackendOpt,
    MinConfidenceOpt,
    PresetOpt,
    QuietOpt,
    WeightsOpt,
    load_model,
    model_ref,
)
from fetalplanes.inference.model_ref import GRAMMAR

ChecklistOpt = Annotated[
    str | None,
    typer.Option("--checklist", help="Put the exam checklist into each study's SR and KOS: "
                 "isuog-mid-trimester, seed4-planes or a FILE.json (as `fetalplanes audit`; "
                 "a zero-shot model is folded to the checklist's preset, whatever --preset "
                 "says). Default: none."),
]
ModelArg = Annotated[
    str,
    typer.Argument(help=f"The model: {GRAMMAR}. Default: the bundled sononet16."),
]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    """One line per event on stderr (associations, batches, studies): never patient data."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("fetalplanes")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def listen(
    model: ModelArg = "sononet16",
    out: Annotated[Path, typer.Option("--out", help="Output folder: received instances, "
                                      "results, SR/KOS reports, journal (created).")] = ...,
    port: Annotated[int, typer.Option(min=0, max=65535,
                                      help="TCP port (0: a free one, printed).")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title.")
                        ] = "FETALPLANES",
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback opens "
                                      "the node to the network (a warning is printed).")
                    ] = "127.0.0.1",
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="Accept associations only from this calling AE title (repeatable); "
        "others are rejected.")] = None,
    forward: Annotated[str | None, typer.Option(
        "--forward", help="Send the originals and the SR/KOS results on to this node, "
        "AET@HOST:PORT (e.g. a PACS).")] = None,
    backend: BackendOpt = BackendChoice.auto,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    min_confidence: MinConfidenceOpt = 0.5,
    batch: Annotated[int, typer.Option(min=1, help="Stored instances taken for "
                                       "classification at once, at most.")] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker processes that "
                                         "decode and classify, started once (0: in the "
                                         "node's own process).")] = 2,
    settle: Annotated[float, typer.Option(min=0.0, help="Seconds without a new instance "
                                          "before a study's results are forwarded.")] = 5.0,
    checklist: ChecklistOpt = None,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every instance.")
                       ] = False,
) -> None:
    """Receive ultrasound over DICOM (C-STORE), classify every frame, write results.

    Accepts C-ECHO and Ultrasound (Multi-frame) Image and Secondary Capture storage.
    Each instance is stored durably before Success is answered; per study a
    Comprehensive SR and a Key Object Selection (best frame of each plane) are written
    under OUT/reports; with --checklist, both carry the study's exam checklist (views
    present, missing, not assessed; the best frame of each). SIGTERM or Ctrl-C finishes
    the associations in flight first.
    """
    from fetalplanes.workflows.dicom_listen import Listener, Peer

    peer = Peer.parse(forward) if forward else None
    if len(ae_title.strip()) == 0 or len(ae_title) > 16:
        fail(f"--ae-title {ae_title!r}: 1 to 16 characters")
    chosen = _checklist(checklist)
    setup_logging(quiet, verbose)
    predictor, info = _predictor(model, weights, preset, backend, min_confidence, chosen)
    listener = Listener(predictor, out, info, ae_title=ae_title, host=host, port=port,
                        allow=allow or (), forward=peer, batch=batch, settle=settle,
                        checklist=chosen, workers=workers)
    if host not in LOOPBACK:
        typer.secho(f"warning: listening on {host}: any host that reaches it can send "
                    "images (use --allow to name the senders)", fg=typer.colors.YELLOW,
                    err=True)
    stop = threading.Event()
    _on_signals(stop)
    listener.start()
    typer.echo(f"fetalplanes: listening as {ae_title} on {host}:{listener.port}; "
               f"results in {out}", err=False)
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    typer.echo("fetalplanes: stopping (finishing associations in flight)", err=True)
    listener.stop()


def _on_signals(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: stop gracefully; a second one ends at once."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _checklist(spec: str | None) -> Any:
    """The checklist named by --checklist (None without it); one line when it is not one."""
    if not spec:
        return None
    from fetalplanes.workflows.checklist import load_checklist

    return load_checklist(spec)


def _predictor(model: str, weights: Path | None, preset: str, backend: BackendChoice,
               min_confidence: float, checklist: Any) -> tuple[Any, dict[str, str]]:
    """The model, fitted to the checklist when there is one, and what results say of it."""
    from fetalplanes.workflows.dicom_listen import fit_checklist, model_info

    predictor = load_model(model_ref(model, weights, preset, backend,
                                     min_confidence=min_confidence))
    if checklist is not None:
        predictor = fit_checklist(predictor, checklist)
    return predictor, model_info(predictor, _model_name(model), backend.value)


def _model_name(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix == ".onnx" else path.name or spec


# ------------------------------------------------------------------ DICOMweb (pacs ...)
UrlArg = Annotated[str, typer.Argument(help="DICOMweb root of the PACS, e.g. "
                                       "http://127.0.0.1:8042/dicom-web")]
UserOpt = Annotated[str | None, typer.Option(
    "--user", help="HTTP user (default: $FETALPLANES_PACS_USER).")]
PasswordOpt = Annotated[str | None, typer.Option(
    "--password", help="HTTP password (default: $FETALPLANES_PACS_PASSWORD; prefer the "
    "variable: options show in the process list). Never printed.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="Bearer token instead of a password (default: $FETALPLANES_PACS_TOKEN).")]
ModalityOpt = Annotated[str | None, typer.Option(
    "--modality", help="Only series of this modality, e.g. US (default: all).")]


def _client(url: str, user: str | None, password: str | None, token: str | None) -> Any:
    from fetalplanes.workflows.dicomweb import Credentials, connect

    return connect(url, Credentials.resolve(user, password, token))


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def pacs_pull(
    url: UrlArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for STUDY/SERIES/SOP.dcm "
                                      "(created; files already there are skipped).")] = ...,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Every study from this date on (YYYY-MM-DD).")] = None,
    modality: ModalityOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    token: TokenOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Download a study, or every study since a date (QIDO-RS, WADO-RS).

    Instances keep the transfer syntax the PACS stored; each file is written atomically,
    so an interrupted pull is resumed by running it again."""
    from fetalplanes.workflows.dicomweb import pull

    if (study is None) == (since is None):
        fail("give either --study UID or --since DATE")
    rep = pull(_client(url, user, password, token), url, out, study=study, since=since,
               modality=modality, progress=_progress(quiet))
    typer.echo(f"pulled {rep.transferred} instance(s), {rep.skipped} already in {out} "
               f"({rep.found} found)")
    _report_refused(rep.refused)


def pacs_push(
    url: UrlArg,
    files: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    user: UserOpt = None,
    password: PasswordOpt = None,
    token: TokenOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Upload DICOM files with STOW-RS (resumable).

    Instances the PACS already holds are skipped, so an interrupted push is resumed by
    running it again."""
    from fetalplanes.workflows.dicomweb import dicom_files, push

    paths = dicom_files(files)
    if not paths:
        fail("no files to push")
    rep = push(_client(url, user, password, token), url, paths, progress=_progress(quiet))
    typer.echo(f"pushed {rep.transferred} instance(s), {rep.skipped} already on the PACS")
    _report_refused(rep.refused)


def pacs_classify(
    url: UrlArg,
    study: Annotated[str, typer.Option("--study", help="Study Instance UID.")],
    model: Annotated[str, typer.Option("--model", help=f"The model: {GRAMMAR}.")
                     ] = "sononet16",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Work folder (default: ./pacs-classify/STUDY): pulled files, "
        "results, SR/KOS; reused when run again.")] = None,
    modality: Annotated[str | None, typer.Option(
        "--modality", help="Classify series of this modality (default US; '' for all).")
    ] = "US",
    no_push: Annotated[bool, typer.Option("--no-push", help="Keep the SR and KOS local.")
                       ] = False,
    backend: BackendOpt = BackendChoice.auto,
    weights: WeightsOpt = None,
    preset: PresetOpt = "seed4",
    min_confidence: MinConfidenceOpt = 0.5,
    checklist: ChecklistOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    token: TokenOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pull a study, classify every frame, push its SR and KOS back into the study (with
    --checklist, carrying the study's exam checklist)."""
    from fetalplanes.workflows.dicomweb import classify_study

    chosen = _checklist(checklist)
    setup_logging(True)
    client = _client(url, user, password, token)
    predictor, info = _predictor(model, weights, preset, backend, min_confidence, chosen)
    work = out or Path("pacs-classify") / study
    res = classify_study(client, url, study, predictor, info, work, modality=modality or None,
                         progress=_progress(quiet), push_results=not no_push,
                         checklist=chosen)
    stats = res["stats"]
    typer.echo(f"classified {stats.frames} frame(s) of {stats.classified} instance(s) "
               f"(study {study}); results in {work}")
    if not res["reports"]:
        fail("no frame could be classified: no SR or KOS written", 1)
    if res["checklist"] is not None:
        r = res["checklist"]
        typer.echo(f"checklist {r.checklist.name}: {len(r.present)}/{r.assessed} views "
                   f"present; missing: {', '.join(r.missing) or 'none'}")
    if not no_push:
        pushed = res["pushed"]
        typer.echo(f"pushed {pushed.transferred} result document(s) (SR, KOS) to the study, "
                   f"{pushed.skipped} already there")
    _report_refused(res["pulled"].refused + res["pushed"].refused)


def _report_refused(refused: list[str]) -> None:
    for line in refused[:20]:
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)
    if len(refused) > 20:
        typer.secho(f"warning: ... and {len(refused) - 20} more", fg=typer.colors.YELLOW,
                    err=True)
