"""`fetalplanes bench`: measured speed of decoding, inference, training and memory.

Why: speed claims should come from one reproducible command run on the user's own
machine, with the machine printed beside the numbers. Everything runs on
synthetic 800x540 PNG scans written to a temporary folder, with a randomly
initialised model (weights do not change speed), through the package's real code
paths: `Predictor.predict_paths` (worker-process decoding), the training loop's
`train_epoch`, the decode-once cache and the `sort` command in a fresh process.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fetalplanes.console import cli_command
from fetalplanes.console import progress as progress_bar
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.synth import SEED4, render_phantom
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.rejection import MAX_BANK
from fetalplanes.models.checkpoint import ModelCard, save_checkpoint

SCAN_SIZE = (540, 800)  # (height, width) of the generated scans, like FETAL_PLANES_DB

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}
#: (result key, comparison, target, what it is) for a 2-core CPU with the ONNX backend.
CPU_TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("predict_onnx_b64_img_s", ">=", 80.0, "sort/predict end to end, img/s (fp32)"),
    ("predict_onnx-int8_b64_img_s", ">=", 80.0, "sort/predict end to end, img/s (int8)"),
    ("latency_onnx_p50_ms", "<=", 20.0, "single-image latency p50, ms (fp32)"),
    ("latency_onnx-int8_p50_ms", "<=", 20.0, "single-image latency p50, ms (int8)"),
    ("train_cache_img_s", ">=", 15.0, "training from cache, img/s"),
    ("sort_peak_mb", "<", 1500.0, "peak memory while sorting, MB"),
    ("zero_shot_onnx_img_s", ">=", 90.0, "SonoNet-16 predict of a folder, img/s"),
    ("zero_shot_onnx-int8_img_s", ">=", 90.0, "SonoNet-16 int8 predict of a folder, img/s"),
    ("zero_shot_onnx_peak_mb", "<=", 800.0, "SonoNet-16 predict peak memory, MB"),
    ("zero_shot_onnx_one_image_s", "<=", 1.5, "SonoNet-16 one image on the CLI, s"),
    ("scan_fps", ">=", 25.0, "scan of a clip with SonoNet-16, frames/s"),
    ("network_onnx-int8_frames_s", ">=", 40.0, "DICOM node, storescu -> listen, frames/s (int8)"),
    ("network_onnx_frames_s", ">=", 25.0, "DICOM node, storescu -> listen, frames/s (fp32)"),
)


@dataclass
class BenchOptions:
    """What to benchmark; the sizes of each measurement follow from `quick` and `device`."""

    device: str = "cpu"
    quick: bool = False
    compile: bool = False
    model: str = "efficientnet_lite0"
    img_size: int | None = None  # square input override; None = the model's default
    images: int | None = None  # PNGs for the end-to-end rows (default 2000, quick 32)
    rss_images: int | None = None  # images sorted by the memory run (default: `images`)
    workers: int | None = None  # decode worker processes (default: the package default)


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    images: int
    torch_images: int  # eager torch on a CPU is slow: fewer images keep the run short
    unique: int  # distinct PNGs rendered; the rest are hard links
    batches: tuple[int, ...]
    model_batch: int
    latency_reps: int
    stage_reps: int
    train_batch: int
    train_steps: int
    train_warmup: int
    rss_images: int


def make_plan(opts: BenchOptions) -> Plan:
    """Work sizes: `--quick` finishes in seconds, the full run in minutes."""
    cuda, quick = opts.device == "cuda", opts.quick
    images = opts.images or (32 if quick else 2000)
    if images < 2:
        raise FetalPlanesError("--images must be at least 2")
    cpu_torch = 8 if quick else max(2, images // 5)
    return Plan(
        images=images,
        torch_images=images if cuda else min(images, cpu_torch),
        unique=min(images, 16 if quick else 200),
        batches=(1, 64, 256) if cuda else (1, 64),
        model_batch=256 if cuda else (8 if quick else 64),
        latency_reps=5 if quick else 60,
        stage_reps=3 if quick else 40,
        train_batch=256 if cuda else (4 if quick else 32),
        train_steps=(10 if cuda else 2) if quick else (50 if cuda else 8),
        train_warmup=5 if cuda else 1,
        rss_images=opts.rss_images or images,
    )


@dataclass
class Row:
    """One line of the results table (and one entry of the JSON `results`)."""

    key: str
    what: str
    engine: str  # backend/device, e.g. "onnx/cpu"; "-" for steps without a model
    batch: int | str
    value: float
    unit: str
    note: str = ""


@dataclass
class BenchReport:
    machine: dict[str, Any]
    options: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    load_average: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def results(self) -> dict[str, float]:
        return {r.key: r.value for r in self.rows}

    def targets(self) -> list[dict[str, Any]]:
        """Met/missed for the CPU targets (only when benchmarking a CPU)."""
        if self.options.get("device") != "cpu":
            return []
        res = self.results
        return [
            {
                "key": key,
                "what": what,
                "target": f"{op} {target:g}",
                "value": res[key],
                "met": _OPS[op](res[key], target),
            }
            for key, op, target, what in CPU_TARGETS
            if key in res
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "options": self.options,
            "load_average": self.load_average,
            "seconds": round(self.seconds, 1),
            "results": self.results,
            "rows": [asdict(r) for r in self.rows],
            "targets": self.targets(),
        }


# ------------------------------------------------------------------ machine and memory


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    from fetalplanes.inference.onnx import default_threads

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": default_threads(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _parent_map() -> dict[int, int]:
    """pid -> parent pid for every visible process (Linux /proc)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (decode workers included)."""
    parents = _parent_map()
    tree, frontier = [root], {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier}
        tree += sorted(frontier)
    return tree


def _rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in kB; (0, 0) once it has gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _getrusage_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


class MemorySampler:
    """Peak memory of a process tree, sampled from /proc in a background thread.

    RSS summed over processes counts pages that forked workers share several times
    (an upper bound); PSS splits shared pages between them (the real total).
    Without /proc, the main process's own peak from getrusage is reported instead.

    Reading smaps_rollup of a process that has imported torch costs ~30 ms of CPU, so
    the sampler waits at least `_OVERHEAD`⁻¹ times as long as its last sample took:
    sampling 3 processes every 0.1 s would take most of a core from what it measures.
    """

    _OVERHEAD = 0.02  # share of one core the sampler may use

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_root_rss_kb = 0  # the main process alone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._proc = Path("/proc/self/smaps_rollup").is_file()
        self._cost = 0.0  # seconds the last sample took

    def sample(self) -> None:
        if not self._proc:
            self.peak_rss_kb = self.peak_pss_kb = self.peak_root_rss_kb = _getrusage_kb()
            return
        t0 = time.perf_counter()
        tree = [_rollup(p) for p in process_tree(self.pid)]
        self.peak_root_rss_kb = max(self.peak_root_rss_kb, tree[0][0])
        self.peak_rss_kb = max(self.peak_rss_kb, sum(r for r, _ in tree))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in tree))
        self._cost = time.perf_counter() - t0

    def _loop(self) -> None:
        while not self._stop.wait(max(self.interval, self._cost / self._OVERHEAD)):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        """Peak PSS of the tree in MB (what the processes really held together)."""
        return round(self.peak_pss_kb / 1024, 1)

    @property
    def peak_rss_mb(self) -> float:
        """Peak of the RSS summed over the tree (shared pages counted in each process)."""
        return round(self.peak_rss_kb / 1024, 1)

    @property
    def peak_root_rss_mb(self) -> float:
        return round(self.peak_root_rss_kb / 1024, 1)


# ------------------------------------------------------------------ inputs


def write_scans(folder: Path, n: int, unique: int, progress: bool = True) -> list[Path]:
    """`n` synthetic 800x540 PNG scans; `unique` are rendered, the others hard-linked.

    Each file is read and decoded on its own, so links cost the pipeline what copies
    would, without rendering thousands of phantoms first.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths: list[Path] = []
    for i in progress_bar(range(n), desc="writing synthetic scans", unit="img",
                          disable=not progress):
        p = folder / f"scan_{i:05d}.png"
        if i < unique:
            Image.fromarray(render_phantom(SEED4[i % len(SEED4)], rng, SCAN_SIZE)).save(p)
        else:
            try:
                os.link(paths[i % unique], p)
            except OSError:
                p.write_bytes(paths[i % unique].read_bytes())
        paths.append(p)
    return paths


#: Feature-bank rows of the benchmark run: a full bank, as FETAL_PLANES_DB's ~7,000
#: training images give after subsampling.
BENCH_BANK = MAX_BANK


def make_run(folder: Path, model: str, img_size: int | None) -> Path:
    """A run folder as `train` writes it, with a randomly initialised model (speed does not
    depend on weights) and a random feature bank of a full data set's size for the default
    knn not-target score, so the bench pays for everything a real run computes."""
    from fetalplanes.inference.rejection import BANK_FILE, auto_k, feature_dim, make_bank, save_bank
    from fetalplanes.models import create_model, get_spec

    spec = get_spec(model)
    pp = spec.preprocess if img_size is None else spec.preprocess.with_(size=(img_size, img_size))
    torch.manual_seed(0)
    net = create_model(model, len(SEED4), pretrained=False, input_size=pp.size).eval()
    dim = feature_dim(net, pp.size)
    folder.mkdir(parents=True, exist_ok=True)
    save_bank(folder, make_bank(np.random.default_rng(0).normal(size=(BENCH_BANK, dim))))
    rule = {"method": "knn", "k": auto_k(BENCH_BANK), "bank": BANK_FILE, "threshold": 0.5}
    save_checkpoint(folder, net, ModelCard(model, list(SEED4), pp, rejection=rule))
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ training set-up


@dataclass
class Trainer:
    """The real training step (`train.train_epoch`) on a fresh model, for timing only."""

    loop: Any
    opt: torch.optim.Optimizer
    criterion: torch.nn.Module
    augment: Any
    batch: int
    compiled: bool = False

    def run(self, data: Any, order: torch.Tensor) -> None:
        from fetalplanes.engine.train import train_epoch

        lr = self.opt.param_groups[0]["lr"]
        train_epoch(
            self.loop,
            data,
            order,
            self.opt,
            self.criterion,
            self.augment,
            lambda: lr,
            self.batch,
            "bench",
            False,
        )
        _sync(self.loop.device)

    @property
    def details(self) -> str:
        cuda = self.loop.device.type == "cuda"
        dtype = "bf16" if cuda else "fp32"
        return f"{dtype}, channels_last" + (", compiled" if self.compiled else "")


def make_trainer(
    model: str, pp: Preprocess, device: torch.device, batch: int, compiled: bool
) -> Trainer:
    """Training set-up as `train` builds it on `device` (channels_last; bf16 on CUDA)."""
    from fetalplanes.data.transforms import BatchAugment, get_augment
    from fetalplanes.engine.train import make_loop
    from fetalplanes.models import create_model

    torch.manual_seed(0)
    net = create_model(model, len(SEED4), pretrained=False, input_size=pp.size)
    net, loop = make_loop(net, pp, device, compile=compiled)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    augment = BatchAugment(get_augment("origin"), torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    return Trainer(loop, opt, crit, augment, batch, compiled)


# ------------------------------------------------------------------ the benchmark


class Bench:
    """One benchmark run: inputs in a temporary folder, one method per measurement.

    Measurements that fork decode workers run before those that decode in this
    process, so no worker is ever forked from a process with busy library thread
    pools (OpenCV's is not fork-safe).
    """

    def __init__(self, opts: BenchOptions, tmp: Path, progress: bool = True):
        from fetalplanes.models.devices import pick_device

        self.opts = opts
        self.device = pick_device(opts.device)
        self.plan = make_plan(opts)
        self.tmp = tmp
        self.progress = progress
        self.rows: list[Row] = []
        self.paths: list[Path] = []
        self.run_dir = tmp / "run"
        self.pp = Preprocess()
        self.predictors: dict[str, Any] = {}

    # ---------------------------------------------------------------- helpers
    def add(
        self,
        key: str,
        what: str,
        engine: str,
        batch: int | str,
        value: float,
        unit: str,
        note: str = "",
    ) -> None:
        self.rows.append(Row(key, what, engine, batch, float(value), unit, note))

    def engine(self, backend: str) -> str:
        return f"{backend}/{'cpu' if backend.startswith('onnx') else self.device.type}"

    # ---------------------------------------------------------------- set-up
    def prepare(self) -> None:
        """Scans, a run folder and one predictor per backend (ONNX exported on the way)."""
        from fetalplanes.inference.predictor import Predictor
        from fetalplanes.models.checkpoint import load_card

        self.paths = write_scans(
            self.tmp / "scans", self.plan.images, self.plan.unique, self.progress
        )
        make_run(self.run_dir, self.opts.model, self.opts.img_size)
        self.pp = load_card(self.run_dir).preprocess
        dev = self.device.type
        self.predictors["torch"] = Predictor.from_run(self.run_dir, backend="torch", device=dev)
        t0 = time.perf_counter()
        try:
            from fetalplanes.tools.export import ensure_onnx

            ensure_onnx(self.run_dir)
            self.predictors["onnx"] = Predictor.from_run(self.run_dir, backend="onnx")
        except FetalPlanesError as exc:
            if "onnxruntime" not in str(exc):
                raise
            return  # no onnxruntime installed: torch rows only
        t = time.perf_counter() - t0
        self.add("onnx_export_s", "ONNX export + session", "onnx/cpu", "-", t, "s")
        from fetalplanes.tools.export import export_int8

        t0 = time.perf_counter()
        export_int8(self.run_dir, calibration=self.paths[0].parent)
        self.predictors["onnx-int8"] = Predictor.from_run(self.run_dir, backend="onnx-int8")
        t = time.perf_counter() - t0
        self.add("int8_export_s", "int8 quantisation + session", "onnx-int8/cpu", "-", t, "s")

    # ---------------------------------------------------------------- inference
    def model_only(self) -> None:
        """Network throughput on prepared pixels: the ceiling for end-to-end speed."""
        batch = self.plan.model_batch
        pixels = np.random.default_rng(0).integers(0, 256, (batch, *self.pp.size), np.uint8)
        for name, pred in self.predictors.items():
            pred.backend.outputs(pixels[:2])
            reps = 1 if (name, self.device.type) == ("torch", "cpu") else 3
            dt = min(_timed(lambda p=pred: p.backend.outputs(pixels)) for _ in range(reps))
            self.add(
                f"model_{name}_img_s",
                "model only (prepared pixels)",
                self.engine(name),
                batch,
                batch / dt,
                "img/s",
            )

    def predict(self, name: str, batch: int) -> None:
        """End to end: files -> decode/crop/resize in workers -> model -> predictions."""
        paths = self.paths[: self.plan.torch_images] if name == "torch" else self.paths
        pred = self.predictors[name]
        with MemorySampler() as mem:
            t0 = time.perf_counter()
            n = sum(r.ok for r in pred.predict_paths(paths, batch, self.opts.workers))
            dt = time.perf_counter() - t0
        if n != len(paths):
            raise FetalPlanesError(f"bench: {len(paths) - n} synthetic scans failed to decode")
        self.add(
            f"predict_{name}_b{batch}_img_s",
            "predict end to end",
            self.engine(name),
            batch,
            n / dt,
            "img/s",
            f"{n} images; peak {mem.peak_mb:.0f} MB (all processes)",
        )

    def latency(self, name: str) -> None:
        """One file at a time, in this process, decode to result (`predict scan.png`)."""
        pred = self.predictors[name]
        list(pred.predict_paths(self.paths[:1], 1, 0))  # warm-up
        times = []
        for p in (self.paths * self.plan.latency_reps)[: self.plan.latency_reps]:
            times.append(1000 * _timed(lambda p=p: list(pred.predict_paths([p], 1, 0))))
        p50, p95 = np.percentile(times, [50, 95])
        eng = self.engine(name)
        self.add(f"latency_{name}_p50_ms", "single-image latency p50", eng, 1, p50, "ms")
        self.add(f"latency_{name}_p95_ms", "single-image latency p95", eng, 1, p95, "ms")

    def stages(self) -> None:
        """Median cost of each step for one image (decode path on one core), crop's share."""
        from fetalplanes.data.crop import crop_ultrasound
        from fetalplanes.data.images import decode_image

        no_crop = self.pp.with_(crop=False)
        t: dict[str, list[float]] = {"decode": [], "crop": [], "resize": []}
        for p in (self.paths * self.plan.stage_reps)[: self.plan.stage_reps]:
            t0 = time.perf_counter()
            gray = decode_image(p.read_bytes(), str(p))
            t1 = time.perf_counter()
            cropped = crop_ultrasound(gray) if self.pp.crop else gray
            t2 = time.perf_counter()
            no_crop.prepare_array(cropped)
            t["decode"].append(t1 - t0)
            t["crop"].append(t2 - t1)
            t["resize"].append(time.perf_counter() - t2)
        ms = {k: 1000 * statistics.median(v) for k, v in t.items()}
        share = f"{100 * ms['crop'] / sum(ms.values()):.0f}% of the decode path"
        h, w = self.pp.size
        self.add("stage_decode_ms", "read + PNG decode (800x540)", "-", 1, ms["decode"], "ms")
        self.add("stage_crop_ms", "ultrasound crop", "-", 1, ms["crop"], "ms", share)
        self.add("stage_resize_ms", f"resize to {h}x{w}", "-", 1, ms["resize"], "ms")
        one = np.full((1, h, w), 128, np.uint8)
        for name, pred in self.predictors.items():
            pred.backend.outputs(one)
            times = [_timed(lambda p=pred: p.backend.outputs(one)) for _ in range(5)]
            self.add(
                f"stage_model_{name}_ms",
                "model forward, one image",
                self.engine(name),
                1,
                1000 * statistics.median(times),
                "ms",
            )

    # ---------------------------------------------------------------- training
    def training(self) -> None:
        """Cache fill/read, then training images/s from cached arrays and from PNG files."""
        from fetalplanes.data.cache import load_arrays

        plan, workers = self.plan, self.opts.workers
        n = plan.train_batch * plan.train_steps
        files = self.paths[:n]  # training from the cache samples these with replacement
        cache = self.tmp / "cache"
        fill = _timed(lambda: load_arrays(files, self.pp, cache, workers, progress=False))
        t0 = time.perf_counter()
        loaded = load_arrays(files, self.pp, cache, workers, progress=False)
        hit = time.perf_counter() - t0
        self.add(
            "cache_fill_img_s",
            "cache fill (decode, crop, resize)",
            "-",
            "-",
            len(files) / fill,
            "img/s",
            f"{len(files)} files",
        )
        self.add(
            "cache_hit_img_s",
            "cache read (hash + memmap)",
            "-",
            "-",
            len(files) / hit,
            "img/s",
            f"{loaded.hits} hits",
        )
        trainer = make_trainer(
            self.opts.model, self.pp, self.device, plan.train_batch, self.opts.compile
        )
        self._train_cached(trainer, loaded.arrays)
        self._train_png(trainer, (self.paths * (n // len(self.paths) + 1))[:n])

    def _train_cached(self, trainer: Trainer, arrays: np.ndarray) -> None:
        from fetalplanes.engine.train import ArrayData

        plan, gen = self.plan, torch.Generator().manual_seed(1)
        data = ArrayData(arrays, np.arange(len(arrays)) % len(SEED4), self.device)
        n = plan.train_batch * plan.train_steps
        trainer.run(
            data, torch.randint(len(arrays), (plan.train_batch * plan.train_warmup,), generator=gen)
        )
        dt = _timed(lambda: trainer.run(data, torch.randint(len(arrays), (n,), generator=gen)))
        where = "GPU-resident" if data.x.device.type == "cuda" else "in memory"
        self.add(
            "train_cache_img_s",
            f"training from cache (uint8 {where}, augment)",
            self.engine("torch"),
            plan.train_batch,
            n / dt,
            "img/s",
            f"{n} images, {trainer.details}",
        )

    def _train_png(self, trainer: Trainer, files: list[Path]) -> None:
        from fetalplanes.data.loading import iter_batches
        from fetalplanes.engine.train import ArrayData

        t0 = time.perf_counter()
        for batch in iter_batches(files, self.pp, self.plan.train_batch, self.opts.workers):
            part = ArrayData(batch.arrays, np.arange(len(batch.indices)) % len(SEED4), self.device)
            trainer.run(part, torch.arange(len(part)))
        dt = time.perf_counter() - t0
        self.add(
            "train_png_img_s",
            "training from PNG (decode every epoch)",
            self.engine("torch"),
            self.plan.train_batch,
            len(files) / dt,
            "img/s",
            f"{len(files)} images, {trainer.details}",
        )

    # ---------------------------------------------------------------- sort, memory
    def sort(self) -> None:
        """`fetalplanes sort --backend onnx-int8` (else onnx): speed and peak memory.

        The full run sorts in a fresh process, so the memory figure is that of a real
        sort, not of this benchmark's own models; `--quick` sorts in this process to
        save the start-up (importing torch alone takes seconds on a busy machine).
        """
        if "onnx" not in self.predictors:
            return
        backend = "onnx-int8" if "onnx-int8" in self.predictors else "onnx"
        n = self.plan.rss_images
        inp = self.paths[0].parent
        if n != len(self.paths):
            inp = self.tmp / "sort-in"
            write_scans(inp, n, self.plan.unique, self.progress)
        out = self.tmp / "sorted"
        t0 = time.perf_counter()
        if self.opts.quick:
            with MemorySampler() as mem:
                self._sort_here(backend, inp, out)
            where = "this process"
        else:
            mem = self._sort_subprocess(backend, inp, out)
            where = "new process"
        dt = time.perf_counter() - t0
        self.add(
            "sort_img_s",
            f"sort ({where}, copies files)",
            self.engine(backend),
            64,
            n / dt,
            "img/s",
            f"{n} images, start-up included",
        )
        self.add(
            "sort_peak_mb",
            f"sort peak memory, all processes (PSS, {where})",
            self.engine(backend),
            64,
            mem.peak_mb,
            "MB",
            f"RSS summed over processes {mem.peak_rss_mb:.0f} MB",
        )
        self.add(
            "sort_main_rss_mb",
            f"sort peak RSS, main process ({where})",
            self.engine(backend),
            64,
            mem.peak_root_rss_mb,
            "MB",
        )

    def _sort_here(self, backend: str, inp: Path, out: Path) -> None:
        from fetalplanes.workflows.sorting import sort_images

        pred = self.predictors[backend]
        sort_images(pred, inp, out, workers=self.opts.workers, progress=False)

    def _sort_subprocess(self, backend: str, inp: Path, out: Path) -> MemorySampler:
        """The memory row: a real `fetalplanes sort` in its own process."""
        cmd = sort_command(self.run_dir, inp, out, backend)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with MemorySampler(proc.pid, interval=0.2) as mem:
            _, err = proc.communicate()
        if proc.returncode != 0:
            last = (err.strip().splitlines() or ["no message"])[-1]
            raise FetalPlanesError(f"bench: sort failed ({last})")
        return mem

    # ---------------------------------------------------------------- all
    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """Every measurement in a fork-safe order (worker-forking ones first)."""
        out: list[tuple[str, Callable[[], None]]] = [("model only", self.model_only)]
        for name in self.predictors:
            for b in self.plan.batches:
                out.append((f"predict {name} batch {b}", lambda n=name, b=b: self.predict(n, b)))
        out.append(("cache and training", self.training))
        out += [(f"latency {n}", lambda n=n: self.latency(n)) for n in self.predictors]
        out += [("stage timings", self.stages), ("sort in a new process", self.sort)]
        return out


def run_bench(opts: BenchOptions, progress: bool = True) -> BenchReport:
    """Run every measurement in a temporary folder and return the report."""
    started = time.perf_counter()
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="fetalplanes-bench-") as tmp:
        bench = Bench(opts, Path(tmp), progress)
        report = BenchReport(
            machine_info(bench.device.type), asdict(opts) | {"plan": asdict(bench.plan)}
        )
        bench.prepare()
        steps = bench.steps()
        bar = progress_bar(steps, unit="step", disable=not progress, leave=False, summary=False)
        for what, step in bar:
            bar.set_description(what)
            step()
        bar.close()
    report.rows = bench.rows
    report.load_average = {"start": load_start, "end": _load()}
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------ output


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def print_report(report: BenchReport) -> None:
    """Machine, load, the results table and the targets, as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    con, m = Console(), report.machine
    con.print(
        f"[bold]machine[/bold]: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"torch {m['torch']} ({m['torch_threads']} threads), onnxruntime "
        f"{m['onnxruntime'] or 'not installed'}, GPU {m['gpu'] or 'none'}"
    )
    load = report.load_average
    con.print(f"load average (1/5/15 min): start {load.get('start')}, end {load.get('end')}")
    t = Table("measurement", "engine", "batch", "result", "unit", "note")
    for r in report.rows:
        t.add_row(r.what, r.engine, str(r.batch), _fmt(r.value), r.unit, r.note)
    con.print(t)
    targets = report.targets()
    if targets:
        tt = Table("target (2-core CPU, onnx)", "wanted", "measured", "met")
        for g in targets:
            met = "[green]yes[/green]" if g["met"] else "[red]no[/red]"
            tt.add_row(g["what"], g["target"], _fmt(g["value"]), met)
        con.print(tt)
    con.print(f"finished in {report.seconds:.0f} s")


def write_json(report: BenchReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def sort_command(run: Path, inp: Path, out: Path, backend: str) -> list[str]:
    """The `fetalplanes sort` command line the memory row runs (tests run it too)."""
    return cli_command("sort", str(run), str(inp), str(out), "--backend", backend, "--quiet")


def start_cli(args: list[str], ready: str, what: str) -> tuple[subprocess.Popen[str], str]:
    """Start `fetalplanes ARGS` (a server the benches measure from outside) and return it
    with its first stdout line, which must contain `ready`; else one line with its stderr."""
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if ready not in line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise FetalPlanesError(f"bench: {what} did not start ({err.strip()[-200:]})")
    return proc, line
