"""Fault-injection helpers for the sort tests: a tiny model, tiny scans, sort jobs in
child processes that can be killed, /proc inspection, and injected output faults.

Child jobs start from a multiprocessing *forkserver* that has imported torch and
fetalplanes once, so a job starts in milliseconds instead of the seconds a fresh
`python -m fetalplanes` needs; each job is still a separate process with its own decode
workers, which is what the kill tests need.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # children import this module: keep it light
    import pytest

PRELOAD = [
    "torch",
    "fetalplanes.cli",
    "fetalplanes.inference.backends",
    "fetalplanes.workflows.sorting",
]
SCAN_SIZE = (48, 64)
_ctx: Any = None
_started: list[Any] = []  # jobs, killed by `kill_jobs` when a test ends


# ------------------------------------------------------------------ data
def tiny_run(folder: Path) -> Path:
    """A run folder with an untrained seed-cnn at 32 px (no training; loads in ~50 ms)."""
    import torch

    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.data.synth import SEED4
    from fetalplanes.models import create_model
    from fetalplanes.models.card import ModelCard
    from fetalplanes.models.checkpoint import save_checkpoint

    torch.manual_seed(4)  # with larger logits, this one puts `make_scans` in two folders
    net = create_model("seed-cnn", len(SEED4), pretrained=False, input_size=(32, 32))
    with torch.no_grad():
        net.classifier[-1].weight.mul_(40)
    card = ModelCard("seed-cnn", list(SEED4), Preprocess(size=(32, 32), crop=False))
    save_checkpoint(folder, net, card)
    return folder


def make_scans(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    """n small phantom PNGs; the first two share a name in two sub-folders (a collision)."""
    import numpy as np
    from PIL import Image

    from fetalplanes.data.synth import SEED4, render_phantom

    rng = np.random.default_rng(seed)
    made = []
    for i in range(start, start + n):
        sub = ("a" if i == 0 else "b") if i < 2 else ""
        name = "scan_00.png" if i < 2 else f"scan_{i:02d}.png"
        path = folder / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_phantom(SEED4[i % 4], rng, size=SCAN_SIZE)).save(path)
        made.append(path)
    return made


def sha_map(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_journal(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.partial")]


def check_sorted(inp: Path, out: Path, classes: list[str]) -> list[dict[str, str]]:
    """Every input has one error-free journal row and one byte-identical copy; nothing else."""
    from fetalplanes.data.sources import OUTPUT_MARKER
    from fetalplanes.workflows.sorting import JOURNAL, SETTINGS, journal_columns

    own = {JOURNAL, SETTINGS, OUTPUT_MARKER}  # the sort's own bookkeeping beside the copies

    header, rows = read_journal(out)
    assert header == journal_columns(classes)
    for r in rows:
        assert None not in r and None not in r.values(), f"malformed journal row {r}"
    sources = sorted(str(p.resolve()) for p in inp.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == sources, "not exactly one row per input"
    assert not [r for r in rows if r["error"]]
    dests = [r["destination"] for r in rows]
    assert len(set(dests)) == len(dests), "two rows share a copy"
    for r in rows:
        assert (out / r["destination"]).read_bytes() == Path(r["path"]).read_bytes()
    files = sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in own
    )
    assert files == sorted(dests), "copies without a row (duplicates) or leftovers"
    return rows


# ------------------------------------------------------------------ processes
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from `state` on


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[1] == str(pid):
                kids.append(int(d.name))
    return kids


def start_ticks(pid: int) -> int:
    st = _stat(pid)
    return int(st[19]) if st else 0


def stray_workers(since_ticks: int) -> list[int]:
    """Orphans (parent 1) started by our forkserver's jobs since `since_ticks`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        st = _stat(pid)
        if st is None or st[1] != "1" or st[0] in ("Z", "X") or int(st[19]) < since_ticks:
            continue
        with contextlib.suppress(OSError):
            if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Those of pids still alive after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def journal_rows(out: Path) -> int:
    try:
        return max(0, (out / "predictions.csv").read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def _context() -> Any:
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _child_setup(log: str | None, slow: float) -> None:
    import torch

    torch.set_num_threads(1)
    # as in a real command: decode workers are forked by the sort process itself
    multiprocessing.set_start_method("fork", force=True)
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if slow:  # keep each copy's temp file around a while: kills land mid-copy
        from fetalplanes.workflows import sorting

        copy = sorting._copy_file

        def slow_copy(*args: Any) -> None:
            copy(*args)
            time.sleep(slow)

        sorting._copy_file = slow_copy


def _sort_job(run: str, inp: str, out: str, workers: int, slow: float, log: str | None) -> None:
    _child_setup(log, slow)
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.workflows.sorting import sort_images

    pred = Predictor.from_run(run)
    sort_images(pred, inp, out, min_confidence=0.0, batch_size=4, workers=workers, progress=False)


def _cli_job(args: list[str], slow: float, log: str | None) -> None:
    _child_setup(log, slow)
    from fetalplanes.cli import app

    app(args, prog_name="fetalplanes")


def start_sort(
    run: Path, inp: Path, out: Path, workers: int = 2, slow: float = 0.0, log: Path | None = None
) -> Any:
    p = _context().Process(
        target=_sort_job,
        args=(str(run), str(inp), str(out), workers, slow, str(log) if log else None),
    )
    p.start()
    _started.append(p)
    return p


def start_cli(args: list[Any], slow: float = 0.0, log: Path | None = None) -> Any:
    p = _context().Process(
        target=_cli_job,
        args=([str(a) for a in args], slow, str(log) if log else None),
    )
    p.start()
    _started.append(p)
    return p


def kill_jobs() -> None:
    """Kill jobs a failed test left running (they are not daemons: they have workers)."""
    while _started:
        p = _started.pop()
        if p.is_alive():
            p.kill()
        p.join(5)


def stop_forkserver() -> None:
    """Stop the forkserver now rather than when the test session ends."""
    global _ctx
    if _ctx is None:
        return
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own tests use it
    if stop is not None:
        with contextlib.suppress(OSError):
            stop()
    _ctx = None


# ------------------------------------------------------------------ injected output faults
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path: Any, target: Path) -> bool:
    try:
        p = Path(os.fsdecode(path)).absolute()
    except TypeError:
        return False
    return p == target or target in p.parents


def deny_writes(monkeypatch: pytest.MonkeyPatch, targets: list[Path], err: int) -> None:
    """Make writes into `targets` (folders or files) fail with `err`, as chmod or a
    read-only mount would (chmod has no effect when the tests run as root)."""
    targets = [t.absolute() for t in targets]

    def denied(path: Any) -> bool:
        return any(_inside(path, t) for t in targets)

    def fail(path: Any) -> None:
        raise OSError(err, os.strerror(err), os.fsdecode(path))

    real_open, real_mkdir = os.open, os.mkdir
    real_link, real_rename, real_replace = os.link, os.rename, os.replace

    def fake_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if flags & _WRITE_FLAGS and denied(path):
            fail(path)
        return real_open(path, flags, *a, **kw)

    def fake_mkdir(path: Any, *a: Any, **kw: Any) -> None:
        if denied(path) and Path(os.fsdecode(path)).absolute() not in targets:
            fail(path)
        real_mkdir(path, *a, **kw)

    def two(real: Callable[..., Any]) -> Callable[..., Any]:
        def fake(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
            if denied(dst):
                fail(dst)
            return real(src, dst, *a, **kw)

        return fake

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "link", two(real_link))
    monkeypatch.setattr(os, "rename", two(real_rename))
    monkeypatch.setattr(os, "replace", two(real_replace))


def _chmod_binds(target: Path) -> bool:
    """Whether permission bits stop this process writing into target (not as root)."""
    probe = (target if target.is_dir() else target.parent) / ".probe"
    try:
        if target.is_dir():
            probe.touch()
            probe.unlink()
        else:
            with open(target, "a"):
                pass
    except PermissionError:
        return True
    return False


@contextlib.contextmanager
def read_only(monkeypatch: pytest.MonkeyPatch, *targets: Path) -> Iterator[str]:
    """`targets` read-only: chmod where that binds (not root), else injected EACCES.
    Yields how ("chmod" or "injected")."""
    modes = [t.stat().st_mode for t in targets]
    for t in targets:
        t.chmod(0o555 if t.is_dir() else 0o444)
    try:
        if _chmod_binds(targets[0]):
            yield "chmod"
            return
        for t, m in zip(targets, modes, strict=True):
            t.chmod(m)
        with monkeypatch.context() as mp:
            deny_writes(mp, list(targets), errno.EACCES)
            yield "injected"
    finally:
        for t, m in zip(targets, modes, strict=True):
            t.chmod(m)


def disk_full(
    monkeypatch: pytest.MonkeyPatch, match: Callable[[str], bool], after: int = 0
) -> None:
    """os.write to a file whose path `match`es fails with ENOSPC (half written first), once
    `after` such writes succeeded."""
    real_write = os.write
    count = [0]

    def fake_write(fd: int, data: Any) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name and match(name):
            count[0] += 1
            if count[0] > after:
                view = memoryview(data)
                if len(view) > 1:
                    real_write(fd, view[: len(view) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fake_write)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg, f"not one line: {msg!r}"
    return msg
