"""Sort keeps its promises under faults: torn journals, kills at any point, orphan
workers, SIGTERM, two sorts at once, read-only outputs, a full disk, bad folders and
unreadable inputs (docs: `fetalplanes.workflows.sorting`).

An untrained 32 px seed-cnn and 48x64 px phantoms keep every run to a fraction of a
second; kill tests run sorts as child processes of a preloaded forkserver (`faults`).
"""

from __future__ import annotations

import csv
import errno
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import faults
import pytest
from faults import check_sorted, one_line, partials, read_journal
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.data.synth import SEED4
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.predictor import Predictor
from fetalplanes.workflows.sorting import JOURNAL, LOCK, journal_columns, sort_images

if not sys.platform.startswith("linux"):
    pytest.skip("fault tests inspect /proc (Linux only)", allow_module_level=True)

CLASSES = list(SEED4)
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield faults.tiny_run(tmp_path_factory.mktemp("tiny") / "run")
    faults.stop_forkserver()


@pytest.fixture(scope="module")
def pred(run: Path) -> Predictor:
    return Predictor.from_run(run)


@pytest.fixture()
def inp(tmp_path: Path) -> Path:
    faults.make_scans(tmp_path / "in", 6)
    return tmp_path / "in"


@pytest.fixture(autouse=True)
def _no_jobs_left() -> object:
    yield
    faults.kill_jobs()


def _sort(pred: Predictor, inp: Path, out: Path, **kw: object):
    return sort_images(pred, inp, out, min_confidence=0.0, workers=0, progress=False, **kw)


def _cli(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _error_lines(output: str) -> list[str]:
    assert "Traceback" not in output
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


# ------------------------------------------------------------------ journal repair
def test_empty_journal_left_by_a_kill_resumes(run: Path, inp: Path, tmp_path: Path) -> None:
    """The issue's repro: `touch OUT/predictions.csv`, then sort twice."""
    out = tmp_path / "o"
    out.mkdir()
    (out / JOURNAL).touch()
    for _ in range(2):
        r = _cli("sort", run, inp, out, "-q", "--min-confidence", "0")
        assert r.exit_code == 0, r.output
    check_sorted(inp, out, CLASSES)
    assert "6 already done" in r.output


def _legacy(out: Path) -> None:
    """Rewrite a journal as fetalplanes 0.1 wrote it (`source` first, fewer columns)."""
    _, rows = read_journal(out)
    cols = [
        "source",
        "destination",
        "label",
        "confidence",
        "uncertain",
        "not_target",
        "model_label",
        "error",
        *(f"p_{c}" for c in CLASSES),
    ]
    with open(out / JOURNAL, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows([r | {"source": r["path"]} for r in rows])


def _cut(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


MUTATIONS = {
    # name: (change the journal, images sorted again by the next run)
    "emptied": (lambda j: j.write_bytes(b""), 6),
    "headerless": (lambda j: j.write_bytes(j.read_bytes().split(b"\n", 1)[1]), 0),
    "torn-last-row": (lambda j: _cut(j, 12), 1),
    "torn-header": (lambda j: j.write_bytes(b"path,frame,la"), 6),
    "nul-tail": (lambda j: j.write_bytes(j.read_bytes() + b"\0" * 300), 0),
    "torn-row-and-nul-tail": (lambda j: j.write_bytes(j.read_bytes()[:-5] + b"\0" * 99), 1),
    "fetalplanes-0.1": (lambda j: _legacy(j.parent), 0),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_damaged_journal_is_repaired(
    pred: Predictor, inp: Path, tmp_path: Path, mutation: str
) -> None:
    change, redone = MUTATIONS[mutation]
    out = tmp_path / "o"
    _sort(pred, inp, out)
    change(out / JOURNAL)
    s = _sort(pred, inp, out)
    assert (s.copied, s.skipped_done) == (redone, 6 - redone)
    check_sorted(inp, out, CLASSES)  # copies were reused, not duplicated
    again = _sort(pred, inp, out)
    assert (again.copied, again.skipped_done) == (0, 6)


def test_foreign_journal_is_refused(pred: Predictor, inp: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    other = ",".join(journal_columns(["Fetal brain", "Maternal cervix"])) + "\r\n"
    for content, says in (
        (other, "other classes"),
        ("path,label\r\n/x.png,Fetal brain\r\n", "not a sort journal"),
    ):
        (out / JOURNAL).write_bytes(content.encode())
        with pytest.raises(FetalPlanesError, match=says) as e:
            _sort(pred, inp, out)
        assert str(out / JOURNAL) in one_line(e.value)
        assert (out / JOURNAL).read_bytes() == content.encode()
    assert not list(out.rglob("*.png"))


# ------------------------------------------------------------------ kills and workers
def _assert_workers_gone(pid: int, kids: list[int], since: int) -> None:
    left = faults.wait_gone(kids, 2.0)  # torch's own watchdog would take 5 s
    assert not left, f"decode workers {left} outlived their parent {pid}"
    assert not faults.children(pid)
    assert not faults.stray_workers(since)


@pytest.mark.slow
def test_kill_loop_resumes_losslessly(run: Path, tmp_path: Path) -> None:
    """SIGKILL sorts at random points (before the first row, mid-copy, mid-journal, ...),
    rerun: one row and one identical copy per input, inputs untouched, no temp files,
    no surviving workers."""
    inp = tmp_path / "in"
    faults.make_scans(inp, 30)
    before = faults.sha_map(inp)
    since = faults.start_ticks(os.getpid())
    for warm in (True, False):  # the first run also starts the forkserver
        t = time.monotonic()
        p = faults.start_sort(run, inp, tmp_path / f"full-{warm}", slow=0.005)
        p.join(60)
        assert p.exitcode == 0
        duration = time.monotonic() - t
    check_sorted(inp, tmp_path / "full-False", CLASSES)
    rng = random.Random(0)
    seen = {"before the first row": 0, "mid-copy": 0}
    kills = 0
    for i in range(14):
        out = tmp_path / f"o{i}"
        for _ in range(2 if i % 2 else 1):  # every other output is killed twice in a row
            p = faults.start_sort(run, inp, out, slow=0.005)
            if kills == 0:
                pass  # at once
            elif kills == 1:
                assert faults.wait_for(lambda out=out: bool(partials(out)), 30)
            else:
                time.sleep(rng.uniform(0, duration))
            kids = faults.children(p.pid)
            p.kill()
            p.join(10)
            kills += 1
            seen["before the first row"] += faults.journal_rows(out) == 0
            seen["mid-copy"] += bool(partials(out))
            _assert_workers_gone(p.pid, kids, since)
        p = faults.start_sort(run, inp, out, slow=0.005)
        p.join(60)
        assert p.exitcode == 0, f"rerun {i} failed"
        check_sorted(inp, out, CLASSES)
        assert not partials(out) and not (out / LOCK).exists()
    assert kills >= 20 and all(seen.values()), seen
    assert faults.sha_map(inp) == before


@pytest.mark.slow
def test_workers_die_with_a_killed_sort(run: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    faults.make_scans(inp, 60)
    out = tmp_path / "o"
    since = faults.start_ticks(os.getpid())
    p = faults.start_sort(run, inp, out, workers=2, slow=0.01)
    assert faults.wait_for(lambda: faults.journal_rows(out) >= 1, 30), "no first batch"
    kids = faults.children(p.pid)
    assert kids, "the sort has no decode workers"
    p.kill()
    p.join(10)
    _assert_workers_gone(p.pid, kids, since)


@pytest.mark.slow
def test_sigterm_interrupts_cleanly(run: Path, tmp_path: Path) -> None:
    """`kill PID` of `fetalplanes sort`: one line "interrupted", exit 130, workers gone,
    no temp files, the lock released, and the next run completes."""
    inp = tmp_path / "in"
    faults.make_scans(inp, 40)  # >= 32 images: the CLI starts decode workers
    out, log = tmp_path / "o", tmp_path / "log.txt"
    since = faults.start_ticks(os.getpid())
    args = ["sort", run, inp, out, "-q", "--batch-size", "4", "--min-confidence", "0"]
    p = faults.start_cli(args, slow=0.01, log=log)
    assert faults.wait_for(lambda: faults.journal_rows(out) >= 1, 30), "no first batch"
    kids = faults.children(p.pid)
    assert kids, "the sort has no decode workers"
    os.kill(p.pid, signal.SIGTERM)
    p.join(10)
    assert p.exitcode == 130
    assert log.read_text().strip().splitlines() == ["error: interrupted"]
    _assert_workers_gone(p.pid, kids, since)
    assert not partials(out) and not (out / LOCK).exists()
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    check_sorted(inp, out, CLASSES)


@pytest.mark.slow
def test_second_sort_into_the_same_output_refuses(
    run: Path, pred: Predictor, tmp_path: Path
) -> None:
    inp = tmp_path / "in"
    faults.make_scans(inp, 30)
    out = tmp_path / "o"
    p = faults.start_sort(run, inp, out, workers=1, slow=0.03)
    assert faults.wait_for(lambda: faults.journal_rows(out) >= 1, 30)
    with pytest.raises(FetalPlanesError, match="another sort") as e:
        _sort(pred, inp, out)
    msg = one_line(e.value)
    assert f"pid {p.pid} on " in msg and "started" in msg and str(out) in msg
    p.join(60)
    assert p.exitcode == 0
    check_sorted(inp, out, CLASSES)  # no doubled rows
    s = _sort(pred, inp, out)
    assert (s.copied, s.skipped_done) == (0, 30)


def test_stale_temp_files_are_removed(pred: Predictor, inp: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    _sort(pred, inp, out)
    plane = next(p for p in out.iterdir() if p.is_dir())
    stale = [plane / ".scan_03.png.4194999.partial", out / f".{JOURNAL}.77.partial"]
    for f in stale:
        f.write_bytes(b"half")
    (out / LOCK).write_text("pid 1 on elsewhere, started long ago\n")  # a killed sort's
    mine = plane / "notes.partial"
    mine.write_bytes(b"not ours")
    _sort(pred, inp, out)
    assert not any(f.exists() for f in stale) and mine.exists()
    mine.unlink()
    check_sorted(inp, out, CLASSES)


def test_file_system_without_locks(
    pred: Predictor, inp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No flock (some network file systems): sort anyway, with a warning, and remove only
    the temp files of processes that are gone."""
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    out = tmp_path / "o"
    _sort(pred, inp, out)
    plane = next(p for p in out.iterdir() if p.is_dir())
    dead = plane / ".scan_03.png.4194999.partial"
    live = plane / f".scan_04.png.{os.getpid()}.partial"  # as if another sort were copying
    for f in (dead, live):
        f.write_bytes(b"half")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    s = _sort(pred, inp, out)
    assert s.skipped_done == 6 and not dead.exists() and live.exists()


# ------------------------------------------------------------------ output faults
def _assert_recovers(pred: Predictor, inp: Path, out: Path) -> None:
    assert not partials(out)
    if (out / JOURNAL).exists():  # whole rows under the header
        header, rows = read_journal(out)
        assert header == journal_columns(CLASSES) and all(None not in r for r in rows)
        assert (out / JOURNAL).read_bytes().endswith(b"\n")
    _sort(pred, inp, out)
    check_sorted(inp, out, CLASSES)


@pytest.mark.parametrize("where", ["output folder", "plane folders", "journal"])
def test_read_only_output(
    pred: Predictor, inp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "o"
    if where == "output folder":
        out.mkdir()
        targets = [out]
    elif where == "plane folders":
        _sort(pred, inp, out)  # every image lands in a plane folder that now exists ...
        shutil.rmtree(out)
        out.mkdir()
        for c in [*CLASSES, "uncertain", "not_target"]:
            (out / c).mkdir()  # ... and can no longer be written to
        targets = [out / c for c in [*CLASSES, "uncertain", "not_target"]]
    else:
        _sort(pred, inp, out)
        faults.make_scans(inp, 2, seed=9, start=6)
        targets = [out / JOURNAL]
    files_before = sorted(out.rglob("*"))
    with faults.read_only(monkeypatch, *targets), pytest.raises(FetalPlanesError) as e:
        _sort(pred, inp, out)
    msg = one_line(e.value)
    assert "permission denied" in msg
    assert any(msg.startswith(str(t)) for t in targets), msg
    if where == "output folder":
        assert sorted(out.rglob("*")) == files_before
    _assert_recovers(pred, inp, out)


def test_read_only_file_system(
    pred: Predictor, inp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    with monkeypatch.context() as m:
        faults.deny_writes(m, [out], errno.EROFS)
        with pytest.raises(FetalPlanesError, match="read-only file system") as e:
            _sort(pred, inp, out)
    assert one_line(e.value).startswith(str(out))
    _sort(pred, inp, out)
    check_sorted(inp, out, CLASSES)


def test_disk_full_during_a_copy(
    pred: Predictor, inp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        faults.disk_full(m, lambda name: name.endswith(".partial") and ".png." in name, after=3)
        with pytest.raises(FetalPlanesError, match="no space left on device") as e:
            _sort(pred, inp, out)
    msg = one_line(e.value)
    assert msg.startswith(str(out)) and ".png" in msg and ".partial" not in msg
    assert len(read_journal(out)[1]) == 3
    _assert_recovers(pred, inp, out)


def test_disk_full_while_journalling(
    pred: Predictor, inp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        faults.disk_full(m, lambda name: name == str(out / JOURNAL), after=2)
        with pytest.raises(FetalPlanesError, match="no space left on device") as e:
            _sort(pred, inp, out)
    assert one_line(e.value).startswith(str(out / JOURNAL))
    assert len(read_journal(out)[1]) == 2  # the half-written row was cut off again
    _assert_recovers(pred, inp, out)  # the third image's copy is reused, not doubled


# ------------------------------------------------------------------ bad folders and inputs
def test_output_containing_the_input_is_refused(
    run: Path, pred: Predictor, inp: Path, tmp_path: Path
) -> None:
    for out in (tmp_path, inp / ".."):
        with pytest.raises(FetalPlanesError, match="contains the input folder") as e:
            _sort(pred, inp, out)
        one_line(e.value)
    r = _cli("sort", run, inp, inp / "..", "-q")
    assert r.exit_code == 2 and len(_error_lines(r.output)) == 1
    assert not (tmp_path / JOURNAL).exists() and not (tmp_path / LOCK).exists()


def test_all_unreadable_exits_1_and_errors_are_journalled_once(run: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "o"
    inp.mkdir()
    for i in range(3):
        (inp / f"bad{i}.png").write_bytes(b"not a png")
    for _ in range(2):
        r = _cli("sort", run, inp, out, "-q")
        assert r.exit_code == 1, r.output
        assert _error_lines(r.output) == [f"error: none of the 3 images in {inp} could be read"]
        _, rows = read_journal(out)
        assert len(rows) == 3 and all(r_["error"] for r_ in rows)
    faults.make_scans(tmp_path / "fix", 3)
    shutil.copy(tmp_path / "fix" / "scan_02.png", inp / "bad0.png")  # one file fixed
    r = _cli("sort", run, inp, out, "-q")
    assert r.exit_code == 0, r.output
    _, rows = read_journal(out)
    ok = [r_ for r_ in rows if not r_["error"]]
    assert len(rows) == 4 and len(ok) == 1 and ok[0]["path"].endswith("bad0.png")
    assert (out / ok[0]["destination"]).read_bytes() == (inp / "bad0.png").read_bytes()
