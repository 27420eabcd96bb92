"""Zero-shot benchmark rows: the bundled SonoNet-16 end to end, as a user runs it.

Each measurement is a fresh process (`python -m fetalplanes predict sononet16 DIR`), so
start-up, imports, worker start and result writing are all counted. Beside it runs a
plain batch-1 loop written here (PIL decode, resize, SonoNet-16 in torch): the baseline
the issue measured, so the speed-up is a ratio taken in one run on one machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fetalplanes.console import cli_command
from fetalplanes.errors import FetalPlanesError
from fetalplanes.tools.bench import (
    BenchOptions,
    BenchReport,
    MemorySampler,
    Row,
    _load,
    machine_info,
    write_scans,
)

#: The baseline a user would write first: decode with PIL, resize to SonoNet's input,
#: standardise, one image per forward pass in torch. No crop: the simplest correct loop.
PLAIN_LOOP = """
import sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from fetalplanes.models import create_model
torch.set_num_threads(2)
net = create_model("sononet16", 14).eval()
n = 0
with torch.inference_mode():
    for f in sorted(Path(sys.argv[1]).glob("*.png")):
        g = np.asarray(Image.open(f).convert("L").resize((288, 224)), np.float32)
        x = torch.from_numpy(255 * (g - g.mean()) / max(g.std(), 1e-6))[None, None]
        net(x).softmax(1)
        n += 1
print(n)
"""


def _timed_process(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak MB of the process tree) of a command; raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with MemorySampler(proc.pid, interval=0.2) as mem:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise FetalPlanesError(f"bench: {' '.join(cmd[2:5])} failed ({last})")
    return wall, mem.peak_rss_mb


def _predict_cmd(backend: str, target: Path) -> list[str]:
    return [*cli_command(), "predict", "sononet16", str(target),
            "--backend", backend, "--format", "csv", "--quiet"]


def zero_shot_rows(tmp: Path, n_images: int,
                   backends: tuple[str, ...] = ("torch", "onnx", "onnx-int8"),
                   progress: bool = True) -> list[Row]:
    """End-to-end img/s and peak memory per backend, one-image latency, and the plain loop."""
    scans = write_scans(tmp / "zero-shot-scans", n_images, min(n_images, 64), progress)
    folder = scans[0].parent
    rows: list[Row] = []
    speeds: dict[str, float] = {}
    for backend in backends:
        wall, peak = _timed_process(_predict_cmd(backend, folder))
        speeds[backend] = n_images / wall
        engine = f"{backend}/cpu"
        rows.append(Row(f"zero_shot_{backend}_img_s", "SonoNet-16 predict, new process",
                        engine, "auto", n_images / wall, "img/s",
                        f"{n_images} scans 800x540, start-up included"))
        rows.append(Row(f"zero_shot_{backend}_peak_mb", "SonoNet-16 predict peak memory",
                        engine, "auto", peak, "MB", "RSS of all processes"))
        one, _ = _timed_process(_predict_cmd(backend, scans[0]))
        rows.append(Row(f"zero_shot_{backend}_one_image_s", "SonoNet-16 one image, new process",
                        engine, 1, one, "s", "start-up included"))
    wall, peak = _timed_process([sys.executable, "-c", PLAIN_LOOP, str(folder)])
    plain = n_images / wall
    rows.append(Row("zero_shot_plain_loop_img_s", "plain batch-1 torch loop (baseline)",
                    "torch/cpu", 1, plain, "img/s", f"peak {peak:.0f} MB"))
    rows += scan_rows(tmp, progress)
    best = max(speeds, key=speeds.get) if speeds else None
    if best is not None:
        rows.append(Row("zero_shot_speedup", f"best ({best}) / plain loop, same run",
                        f"{best}/cpu", "-", speeds[best] / plain, "x"))
    return rows


def run_zero_shot(opts: BenchOptions, progress: bool = True) -> BenchReport:
    """Only the zero-shot rows (`fetalplanes bench --only zero-shot`), with machine and load."""
    import tempfile
    from dataclasses import asdict

    started, load_start = time.perf_counter(), _load()
    report = BenchReport(machine_info("cpu"), asdict(opts))
    n = opts.images or (16 if opts.quick else 1310)
    with tempfile.TemporaryDirectory(prefix="fetalplanes-bench-") as tmp:
        report.rows = zero_shot_rows(Path(tmp), n, progress=progress)
    report.load_average = {"start": load_start, "end": _load()}
    report.seconds = time.perf_counter() - started
    return report


#: Frames of the generated sweep (10 s at 25 frames/s), 800x540 phantoms of every plane.
SCAN_FRAMES = 250


def scan_rows(tmp: Path, progress: bool = True) -> list[Row]:
    """`fetalplanes scan sononet16 CLIP` on a generated clip: frames/s in a new process
    (start-up included) and the steady pipeline rate (after a warm-up batch)."""
    import numpy as np

    from fetalplanes.data.synth import SEED4, render_phantom
    from fetalplanes.data.video import write_video
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.workflows.scan import measure_scan_fps

    rng = np.random.default_rng(0)
    per = SCAN_FRAMES // len(SEED4)
    frames = [render_phantom(plane, rng, (540, 800)) for plane in SEED4 for _ in range(per)]
    clip = write_video(tmp / "sweep.mp4", frames, 25)
    n = len(frames)
    wall, peak = _timed_process([*cli_command(), "scan", "sononet16",
                                 str(clip), "--out", str(tmp / "scan-out"), "--quiet"])
    steady = measure_scan_fps(Predictor.load("sononet16"), clip)
    return [
        Row("scan_fps", "scan a clip with SonoNet-16, new process", "auto/cpu", "-", n / wall,
            "frames/s", f"{n} frames 800x540, start-up included; peak {peak:.0f} MB"),
        Row("scan_steady_fps", "scan pipeline after warm-up", "auto/cpu", "-", steady,
            "frames/s", "decode, prepare, network, smoothing"),
    ]
