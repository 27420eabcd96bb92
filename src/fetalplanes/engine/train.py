"""Training: patient-grouped split -> decode-once arrays -> fine-tune -> calibrate -> run folder.

A run folder (Ultralytics-style) holds `weights.safetensors`, `model.json` (the
sidecar), `history.csv`, `curves.png` and `train_config.json`. The best epoch by
validation loss is what is kept.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from fetalplanes.console import info, plural, report_failures, warn
from fetalplanes.console import progress as progress_bar
from fetalplanes.data.cache import default_cache_dir, load_arrays
from fetalplanes.data.datasets import (
    LabelledData,
    Sample,
    Split,
    load_dataset,
    split_by_patient,
    split_counts,
)
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.transforms import BatchAugment, get_augment, normalize
from fetalplanes.engine import distributed
from fetalplanes.engine.metrics import classification_metrics
from fetalplanes.engine.plots import training_curves
from fetalplanes.engine.tracking import Tracker, numeric_metrics, open_tracker
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.calibration import (
    SCORES,
    calibrated_probs,
    fit_rejection,
    fit_temperature,
)
from fetalplanes.inference.outputs import Outputs
from fetalplanes.inference.rejection import (
    BANK_FILE,
    auto_k,
    collect_features,
    knn_scores,
    make_bank,
    save_bank,
    stored_bank,
)
from fetalplanes.models import create_model, get_spec
from fetalplanes.models.card import atomic_write_text, load_card
from fetalplanes.models.checkpoint import WEIGHTS, ModelCard, save_checkpoint, unshare
from fetalplanes.models.devices import pick_device
from fetalplanes.models.registry import start_weights


@dataclass
class TrainConfig:
    """Every knob of a training run; saved in the run folder and accepted by --config."""

    model: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # None: the model family's default
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    balance: str = "sampler"  # sampler | loss | none
    freeze_epochs: int = 0
    augment: str = "origin"  # none | origin | strong
    augment_strength: float = 1.0
    early_stopping: int = 0  # patience in epochs; 0 = off
    img_size: int | tuple[int, int] | None = None  # input size override: 96 or (H, W)
    crop: bool | None = None  # override the model's ultrasound-crop default
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # NHWC memory: 1.4-1.7x faster training on CPU, faster on CUDA
    compile: bool = False
    cache: bool = True
    cache_dir: str | None = None
    workers: int | None = None
    rejection_recall: float = 0.95
    rejection_score: str = "knn"  # knn (feature space) | energy | msp | maxlogit
    knn_k: int | None = None  # neighbours for the knn score; None: features.auto_k
    log: str | None = None  # experiment tracking: tensorboard | mlflow (local stores in RUN)
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over the global batch

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):  # 96 means 96 x 96, as on the command line
            self.img_size = (self.img_size, self.img_size)
        elif self.img_size is not None:
            self.img_size = tuple(int(v) for v in self.img_size)  # type: ignore[assignment]
        if self.rejection_score not in SCORES:
            raise FetalPlanesError(
                f"unknown rejection score {self.rejection_score!r}; choose {', '.join(SCORES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.img_size is not None:
            d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FetalPlanesError(f"unknown training option(s) {', '.join(unknown)}")
        d = dict(d)
        if d.get("img_size") is not None:
            d["img_size"] = tuple(d["img_size"])
        return cls(**d)

    def updated(self, **changes: Any) -> TrainConfig:
        d = self.to_dict()
        d.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.from_dict(d)


DEFAULT_LR = {"seed-cnn": 1e-3, "efficientnet": 1e-3, "sononet": 5e-4, "timm": 1e-3}


@dataclass
class TrainResult:
    run: Path
    card: ModelCard
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, Any] = field(default_factory=dict)


def next_run_dir(base: Path, name: str) -> Path:
    """runs/train/NAME, NAME-2, NAME-3 ...: never reuses a folder."""
    for i in range(1, 10_000):
        p = base / (name if i == 1 else f"{name}-{i}")
        if not p.exists():
            return p
    raise FetalPlanesError(f"{base}: too many runs named {name}")


def resolve_run_dir(out: str | Path | None, model: str) -> Path:
    if out is None:
        return next_run_dir(Path("runs") / "train", model)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FetalPlanesError(f"{out}: run folder exists and is not empty; choose another --out")
    return out


def resolve_preprocess(cfg: TrainConfig) -> Preprocess:
    pp = get_spec(cfg.model).preprocess
    if cfg.img_size is not None:
        pp = pp.with_(size=tuple(cfg.img_size))
    if cfg.crop is not None:
        pp = pp.with_(crop=cfg.crop)
    return pp


# ----------------------------------------------------------------- batches


class ArrayData:
    """uint8 images + labels held in memory (or on the GPU when they fit)."""

    def __init__(self, arrays: np.ndarray, labels: np.ndarray, device: torch.device):
        on_gpu = device.type == "cuda" and arrays.nbytes < 0.3 * _free_gpu_bytes(device)
        self.device = device
        self.x = torch.from_numpy(np.ascontiguousarray(arrays)).unsqueeze(1)
        self.y = torch.from_numpy(labels.astype(np.int64))
        if on_gpu:
            self.x, self.y = self.x.to(device), self.y.to(device)
        elif device.type == "cuda":
            self.x = self.x.pin_memory()

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.x.device)
        x = self.x.index_select(0, idx).to(self.device, non_blocking=True)
        y = self.y.index_select(0, idx).to(self.device, non_blocking=True)
        return x, y


def _free_gpu_bytes(device: torch.device) -> int:
    try:
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:  # pragma: no cover - depends on the GPU
        return 0


def epoch_order(labels: np.ndarray, balance: str, gen: torch.Generator) -> Tensor:
    """Indices for one epoch: a permutation, or class-balanced sampling with replacement."""
    n = len(labels)
    if balance != "sampler":
        return torch.randperm(n, generator=gen)
    counts = np.bincount(labels)
    w = torch.from_numpy(1.0 / counts[labels]).double()
    return torch.multinomial(w, n, replacement=True, generator=gen)


def class_weights(labels: np.ndarray, n_classes: int) -> Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = counts.sum() / np.maximum(counts, 1) / n_classes
    return torch.tensor(w, dtype=torch.float32)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (trained while the backbone is frozen)."""
    head: Any = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    for name in ("classifier", "head", "adaption"):
        if head is None and isinstance(getattr(model, name, None), nn.Module):
            head = getattr(model, name)
    if head is None:
        return list(model.parameters())
    return list(head.parameters())


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 1% of the base rate."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ----------------------------------------------------------------- loops


@dataclass
class Loop:
    """Everything one epoch needs."""

    model: nn.Module
    pp: Preprocess
    device: torch.device
    amp: bool
    channels_last: bool

    def inputs(self, x: Tensor) -> Tensor:
        x = normalize(x, self.pp)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(self.inputs(x)).float()
        return self.model(self.inputs(x))


def make_loop(
    model: nn.Module,
    pp: Preprocess,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = True,
    compile: bool = False,
) -> tuple[nn.Module, Loop]:
    """Model on `device` in its fastest layout, and the Loop that feeds it.

    channels_last pays on CPU too (measured 1.4-1.7x per training step for
    EfficientNet-Lite0 at 96-224 px on 2 cores); bf16 autocast only on CUDA.
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compile else model
    return model, Loop(fwd, pp, device, amp and device.type == "cuda", channels_last)


def in_order(
    data: ArrayData, batch_size: int = 128, rows: range | None = None
) -> Iterator[Tensor]:
    """The images of `data` (or its `rows`) in order, batch by batch (uint8, on the device)."""
    rows = range(len(data)) if rows is None else rows
    for start in range(rows.start, rows.stop, batch_size):
        yield data.batch(torch.arange(start, min(start + batch_size, rows.stop)))[0]


@torch.no_grad()
def predict_logits(
    loop: Loop, data: ArrayData, batch_size: int = 128, rows: range | None = None
) -> np.ndarray:
    loop.model.eval()
    outs = [loop.forward(x).float().cpu() for x in in_order(data, batch_size, rows)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), dtype=np.float32)


def train_epoch(
    loop: Loop,
    data: ArrayData,
    order: Tensor,
    opt: torch.optim.Optimizer,
    criterion: nn.Module,
    augment: BatchAugment | None,
    sched: Callable[[], float],
    batch_size: int,
    desc: str,
    progress: bool,
) -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over the epoch's samples."""
    loop.model.train()
    total_loss, correct, seen = 0.0, 0, 0
    n_batches = math.ceil(len(order) / batch_size)
    bar = progress_bar(range(n_batches), desc=desc, unit="batch", disable=not progress,
                       leave=False, summary=False)
    for b in bar:
        idx = order[b * batch_size : (b + 1) * batch_size]
        if len(idx) < 2 and seen:  # BatchNorm cannot train on one sample
            continue
        x, y = data.batch(idx)
        if augment is not None:
            x = augment(x)
        lr = sched()
        for g in opt.param_groups:
            g["lr"] = lr
        logits = loop.forward(x)
        loss = criterion(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return total_loss / max(seen, 1), correct / max(seen, 1)


# ----------------------------------------------------------------- the API


def _load_split_arrays(
    data: LabelledData,
    patients: tuple[str, ...],
    pp: Preprocess,
    cfg: TrainConfig,
    progress: bool,
    name: str,
    report: bool = True,
    kept: list[Sample] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Prepared arrays and labels of a split's readable images; `kept` receives their
    samples in the same order (for per-site metrics)."""
    samples = data.subset(patients)
    cache_dir = (
        (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) if cfg.cache else None
    )
    loaded = load_arrays(
        [s.path for s in samples],
        pp,
        cache_dir,
        cfg.workers,
        progress,
        desc=f"preparing {name} images",
    )
    if loaded.failures and report:
        report_failures(loaded.failures)
    labels = np.array([data.classes.index(samples[i].label) for i in loaded.ok], dtype=np.int64)
    if kept is not None:
        kept.extend(samples[i] for i in loaded.ok)
    return loaded.arrays, labels, [m for _, m in loaded.failures]


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _write_history(run: Path, history: list[dict[str, Any]]) -> None:
    keys = list(history[0]) if history else []
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


RESUME_DIR = ".resume"  # per-epoch state of an unfinished run (removed when it finishes)


def is_finished(run: str | Path) -> bool:
    """True when RUN's `model.json` records final metrics: `finish()` writes that sidecar
    after every other file of the run, so this is the commit mark. A folder of a run that
    stopped (crash, Ctrl-C, a lost torchrun process) has a sidecar without metrics (or
    none) and `.resume/` for `train --resume`: unfinished, never half-written."""
    try:
        side = json.loads((Path(run) / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and bool(side.get("metrics"))


class Trainer:
    """A training run as an object: `setup()`, then `epoch()` until `done`, then `finish()`.

    After every epoch the last state (model, optimiser, RNG, history, best epoch) is written
    to RUN/.resume/ as safetensors + JSON, so `Trainer.resume(RUN)` (`train --resume RUN`)
    continues from the last finished epoch; Ctrl-C keeps every finished epoch.
    The best epoch's weights are RUN/weights.safetensors, as in a finished run.

    A run is finished when its `model.json` has `metrics`: `finish()` writes that sidecar
    last, atomically, after every other file, so a crash never leaves a folder that looks
    finished but is not (`is_finished`).

    Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every epoch
    (`engine.distributed`); `--batch-size` stays the global batch. Rank 0 alone writes
    the run folder, in the same format.
    """

    def __init__(
        self,
        data_root: str | Path | None = None,
        *,
        labels: str | Path | None = None,
        preset: str = "seed4",
        config: TrainConfig | None = None,
        out: str | Path | None = None,
        data: LabelledData | None = None,
        split: Split | None = None,
        progress: bool = True,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        self.cfg = config or TrainConfig()
        if data is None:
            if data_root is None:
                raise FetalPlanesError("train needs a data folder")
            data = load_dataset(data_root, labels, preset)
        self.data = data
        self.split = split or split_by_patient(
            data.samples, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.seed
        )
        self.out = out
        self.progress = progress
        self.on_epoch = on_epoch
        self.history: list[dict[str, Any]] = []
        self.best = (math.inf, 0)
        self.epoch_no = 0
        self.step = 0
        self.stopped_early = False
        self.seconds = 0.0

    # ------------------------------------------------------------ setup
    def setup(self, run: Path | None = None) -> Trainer:
        """Read the images, build model and optimiser, create the run folder (rank 0)."""
        self.dist = distributed.init_from_env(self.cfg.device)
        self.main = self.dist is None or self.dist.is_main
        self.run = run  # type: ignore[assignment]  # chosen in _setup when None
        with self._job():
            self._setup(run)
        return self

    def _setup(self, run: Path | None) -> None:
        cfg, data, dist = self.cfg, self.data, self.dist
        start_weights(cfg.model, cfg.pretrained, cfg.weights)  # before any folder or image
        if run is None and self.main:
            run = resolve_run_dir(self.out, cfg.model)
        if dist is not None:  # rank 0 chose the folder; the others only name it
            run = Path(dist.broadcast_text(str(run) if self.main else ""))
        assert run is not None
        self.run = run
        self.gen = _seed_everything(cfg.seed)
        self.device = dist.device if dist is not None else pick_device(cfg.device)
        spec = get_spec(cfg.model)
        pp = resolve_preprocess(cfg)
        if self.main:
            warn_missing_classes(data, self.split)
            refuse_or_warn_design(data, self.split)
            _print_plan(data, self.split, cfg, self.device, self.run)
        shown = self.progress and self.main
        x_tr, y_tr, fail_tr = _load_split_arrays(data, self.split.train, pp, cfg, shown,
                                                 "train", report=self.main)
        self.val_samples: list[Sample] = []
        x_va, y_va, fail_va = _load_split_arrays(data, self.split.val, pp, cfg, shown,
                                                 "validation", report=self.main,
                                                 kept=self.val_samples)
        if len(y_tr) == 0:
            raise FetalPlanesError("no readable training images")
        if dist is not None:  # same seed, same data: assert it rather than trust it
            dist.check_same("patient split and images", distributed.digest(
                self.split.to_dict(), data.fingerprint(), y_tr, y_va, x_tr[:, ::7, ::7]))
        self.y_tr, self.y_va = y_tr, y_va
        n_classes = len(data.classes)
        model = create_model(cfg.model, n_classes, cfg.pretrained, cfg.weights, input_size=pp.size)
        if cfg.sync_bn:
            model = distributed.convert_sync_batchnorm(model, dist)
        self.model, self.loop = make_loop(
            model, pp, self.device, cfg.amp, cfg.channels_last, cfg.compile and dist is None
        )
        self.train_loop = self.loop
        self.batch = cfg.batch_size
        n_local = len(y_tr)
        if dist is not None:
            self.batch = distributed.local_batch(cfg.batch_size, dist.world)
            n_local = dist.shard_len(len(y_tr))
            ddp = dist.wrap(self.model, find_unused=cfg.freeze_epochs > 0)
            self.train_loop = replace(self.loop, model=torch.compile(ddp) if cfg.compile else ddp)
        self.train_data = ArrayData(x_tr, y_tr, self.device)
        self.val_data = ArrayData(x_va, y_va, self.device)
        self.lr = cfg.lr or DEFAULT_LR.get(spec.family, 1e-3)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, weight_decay=cfg.weight_decay
        )
        weight = class_weights(y_tr, n_classes).to(self.device) if cfg.balance == "loss" else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        self.steps_per_epoch = math.ceil(n_local / self.batch)
        aug_cfg = get_augment(cfg.augment, cfg.augment_strength)
        self.augment = BatchAugment(aug_cfg, self.gen) if aug_cfg is not None else None
        training = cfg.to_dict() | {"lr": self.lr, "device": str(self.device)}
        if dist is not None:
            training |= {"processes": dist.world, "backend": dist.backend}
        self.card = ModelCard(
            architecture=cfg.model,
            classes=list(data.classes),
            preprocess=pp,
            preset=data.preset,
            split=self.split.to_dict(),
            data=_data_record(data, fail_tr + fail_va),
            training=training,
        )
        self.tracker = Tracker()
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            atomic_write_text(self.run / "train_config.json", config_text)
            self.tracker = open_tracker(cfg.log, self.run, self.run.name)
            self.tracker.log_params(training)

    @contextlib.contextmanager
    def _job(self) -> Iterator[None]:
        """In a distributed job, any end of this block becomes the job's one message."""
        if self.dist is None:
            yield
            return
        try:
            yield
        except BaseException as exc:
            self.dist.fail(exc, self._resume_hint())

    def _resume_hint(self) -> str:
        """'; RUN keeps epoch K: ...' when RUN has a finished epoch to resume from."""
        run = getattr(self, "run", None)
        if run is None:
            return ""
        try:
            state = json.loads((Path(run) / RESUME_DIR / "state.json").read_text())
        except (OSError, ValueError):
            return ""
        return (f"; {run} keeps epoch {state.get('epoch')}: continue with the same launcher "
                f"and `fetalplanes train --resume {run}`")

    def _sched(self) -> float:
        total = self.steps_per_epoch * self.cfg.epochs
        warmup = int(self.cfg.warmup_epochs * self.steps_per_epoch)
        value = lr_at(self.step, total, warmup, self.lr)
        self.step += 1
        return value

    @property
    def done(self) -> bool:
        return self.stopped_early or self.epoch_no >= self.cfg.epochs

    # ------------------------------------------------------------ one epoch
    def epoch(self) -> dict[str, Any]:
        """Train one epoch, validate, keep the best weights and the resume state."""
        cfg = self.cfg
        self.epoch_no += 1
        epoch = self.epoch_no
        t0 = time.perf_counter()
        set_backbone_trainable(self.model, epoch > cfg.freeze_epochs)
        order = epoch_order(self.y_tr, cfg.balance, self.gen)
        n_images = len(order)
        if self.dist is not None:  # every rank drew the same order: keep this rank's share
            order = self.dist.shard(order)
        tr_loss, tr_acc = train_epoch(
            self.train_loop, self.train_data, order, self.opt, self.criterion, self.augment,
            self._sched, self.batch, f"epoch {epoch}/{cfg.epochs}", self.progress and self.main,
        )
        if self.dist is not None:
            tr_loss, tr_acc = self.dist.mean(tr_loss, tr_acc)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": round(tr_loss, 5),
            "train_accuracy": round(tr_acc, 5),
        }
        val_loss = tr_loss
        if len(self.val_data):
            logits = self._val_logits()
            y_va = self.y_va
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_va)))
            row |= {
                "val_loss": round(val_loss, 5),
                "val_accuracy": round(float((logits.argmax(1) == y_va).mean()), 5),
            }
        elapsed = time.perf_counter() - t0
        row |= {
            "lr": f"{self.opt.param_groups[0]['lr']:.3g}",
            "seconds": round(elapsed, 2),
            "images_per_s": round(n_images / elapsed, 1),
        }
        self.seconds += elapsed
        self.history.append(row)
        improved = val_loss < self.best[0]
        if improved:
            self.best = (val_loss, epoch)
            if self.main:
                save_checkpoint(self.run, self.model, self.card)
        if self.main:
            _print_epoch(row, improved, self.progress)
            _write_history(self.run, self.history)
        if cfg.early_stopping and epoch - self.best[1] >= cfg.early_stopping:
            if self.main:
                info(f"early stopping: no validation improvement for {cfg.early_stopping} epochs")
            self.stopped_early = True  # every rank saw the same validation: all stop
        if self.main:
            save_resume_state(self)
        self.tracker.log_epoch(epoch, numeric_metrics(row))
        if self.on_epoch is not None:
            self.on_epoch(epoch, row)
        return row

    def _val_logits(self) -> np.ndarray:
        """Logits of the whole validation set; in a distributed job each rank computes a
        block and all of them receive all blocks (every rank takes the same decisions)."""
        if self.dist is None:
            return predict_logits(self.loop, self.val_data)
        n = len(self.val_data)
        self.dist.sync_buffers(self.model)
        part = predict_logits(self.loop, self.val_data, rows=self.dist.block(n))
        return self.dist.gather_rows(part, n, len(self.data.classes))

    # ------------------------------------------------------------ the end
    def finish(self) -> TrainResult:
        """Reload the best epoch, calibrate, fit rejection, write the final run folder.

        In a distributed job, rank 0 does this alone, on the whole validation set (every
        rank holds it); the other ranks leave as soon as training ends.
        """
        if self.dist is not None:
            self.dist.close()
        if not self.main:
            return TrainResult(self.run, self.card, self.history, self.best[1])
        result = _finish(
            self.run, self.model, self.loop, self.card, self.history, self.best[1],
            (self.train_data, self.val_data), self.y_va, self.cfg, self.seconds,
            self.val_samples,
        )
        shutil.rmtree(self.run / RESUME_DIR, ignore_errors=True)
        self.tracker.log_final(numeric_metrics(result.val_metrics))
        for png in sorted(self.run.glob("*.png")):
            self.tracker.log_artifact(png)
        self.tracker.close()
        return result

    def fit(self) -> TrainResult:
        """Every remaining epoch, then `finish()`; Ctrl-C keeps the finished epochs."""
        try:
            with self._job():
                while not self.done:
                    self.epoch()
        except BaseException:
            self.tracker.close(failed=True)
            distributed_job = self.dist is not None  # its message carries the resume hint
            if self.epoch_no >= 1 and (self.run / RESUME_DIR).is_dir() and not distributed_job:
                info(f"interrupted; finished epochs kept: fetalplanes train --resume {self.run}")
            raise
        return self.finish()

    @classmethod
    def resume(cls, run: str | Path, progress: bool = True, epochs: int | None = None) -> Trainer:
        """A trainer that continues RUN from its last finished epoch (same data and split)."""
        run = Path(run)
        state_json = run / RESUME_DIR / "state.json"
        if not state_json.is_file():
            done = (run / "model.json").is_file() and not (run / RESUME_DIR).exists()
            why = "it has finished" if done else "it has no finished epoch to resume from"
            raise FetalPlanesError(f"{run}: cannot resume, {why}")
        state = json.loads(state_json.read_text())
        cfg = TrainConfig.from_dict(state["config"])
        if epochs is not None:
            cfg = cfg.updated(epochs=epochs)
        card = load_card(run)
        root = card.data.get("root")
        if not root or not Path(root).exists():
            raise FetalPlanesError(f"{run}: its training data {root} is not here; cannot resume")
        data = load_dataset(root, card.data.get("labels_file"), card.preset or "seed4")
        trainer = cls(config=cfg, data=data, split=Split.from_dict(card.split), progress=progress)
        trainer.setup(run)
        with trainer._job():
            load_resume_state(trainer, state)
            if trainer.dist is not None:  # every rank must continue from the same files
                tensors = resume_tensors(run, state)
                trainer.dist.check_same("resume state", distributed.digest(
                    state_json.read_bytes(), tensors.stat().st_size))
        if trainer.main:
            info(f"resuming {run} after epoch {trainer.epoch_no} of {cfg.epochs}")
        return trainer


def save_resume_state(t: Trainer) -> None:
    """Model, optimiser and RNG tensors as safetensors, the rest as JSON (no pickles)."""
    folder = t.run / RESUME_DIR
    folder.mkdir(exist_ok=True)
    tensors = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    opt = t.opt.state_dict()
    for i, st in opt["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.generator"] = t.gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    # one tensor file per epoch, named in state.json: a kill between the two writes can
    # never pair one epoch's tensors with another epoch's counters
    name = f"state-epoch{t.epoch_no}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in unshare(tensors).items()}, str(tmp))
    os.replace(tmp, folder / name)
    meta = {
        "tensors": name,
        "epoch": t.epoch_no,
        "step": t.step,
        "best": [t.best[0] if math.isfinite(t.best[0]) else None, t.best[1]],
        "history": t.history,
        "seconds": t.seconds,
        "stopped_early": t.stopped_early,
        "config": t.cfg.to_dict(),
        "param_groups": opt["param_groups"],
    }
    atomic_write_text(folder / "state.json", json.dumps(meta, indent=2) + "\n")
    for old in folder.glob("state-epoch*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def resume_tensors(run: Path, meta: dict[str, Any]) -> Path:
    """The tensor file that belongs to state.json (0.2 runs: state.safetensors)."""
    return Path(run) / RESUME_DIR / meta.get("tensors", "state.safetensors")


def load_resume_state(t: Trainer, meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(resume_tensors(t.run, meta)))
    t.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v.to(t.device)
    t.opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    t.gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    t.epoch_no, t.step = int(meta["epoch"]), int(meta["step"])
    best_loss, best_epoch = meta["best"]
    t.best = (math.inf if best_loss is None else float(best_loss), int(best_epoch))
    t.history = list(meta["history"])
    t.seconds = float(meta.get("seconds", 0.0))
    t.stopped_early = bool(meta.get("stopped_early", False))


def refuse_or_warn_design(data: LabelledData, split: Split) -> None:
    """One class cannot train a classifier (refused); no held-out patients trains, warned."""
    from fetalplanes.data.checks import design_problems

    for problem in design_problems(data, split):
        if problem.startswith("only one class"):
            raise FetalPlanesError(f"{data.root}: {problem}")
        warn(problem)


def warn_missing_classes(data: LabelledData, split: Split) -> None:
    """One warning per split that lacks a class: its metrics would silently skip it."""
    counts = split_counts(data, split)
    for name in ("train", "val", "test"):
        missing = [c for c in data.classes if counts[name].get(c, 0) == 0]
        if missing and any(counts[name].values()):
            warn(f"the {name} split has no images of {', '.join(missing)}")


def train(
    data_root: str | Path | None = None,
    *,
    labels: str | Path | None = None,
    preset: str = "seed4",
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    data: LabelledData | None = None,
    split: Split | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a model on a labelled data folder and write a run folder.

    Pass `data` (already loaded) or `data_root`; pass `split` to use given patient
    groups (cross-validation), otherwise a stratified patient split is made.
    `on_epoch(epoch, history_row)` runs after each epoch (e.g. to prune a tuning trial).
    """
    trainer = Trainer(
        data_root, labels=labels, preset=preset, config=config, out=out, data=data,
        split=split, progress=progress, on_epoch=on_epoch,
    )
    return trainer.setup().fit()


def _finish(
    run: Path,
    model: nn.Module,
    loop: Loop,
    card: ModelCard,
    history: list[dict[str, Any]],
    best_epoch: int,
    data: tuple[ArrayData, ArrayData],
    y_va: np.ndarray,
    cfg: TrainConfig,
    seconds: float,
    val_samples: list[Sample] | None = None,
) -> TrainResult:
    """Reload the best epoch, calibrate and fit rejection on validation, write artefacts
    (MODEL_CARD.md too: what the run knows, per class and per site)."""
    from safetensors.torch import load_file

    from fetalplanes.engine.evaluate import group_metrics
    from fetalplanes.models.model_card import write_model_card

    model.load_state_dict(load_file(str(run / WEIGHTS)))
    train_data, val_data = data
    val_metrics: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    if len(val_data):
        logits, feats = collect_features(model, lambda: in_order(val_data), loop.forward)
        card.temperature = fit_temperature(logits, y_va)
        card.rejection = fit_rejection_rule(run, model, loop, train_data, logits, feats, card, cfg)
        val_metrics = classification_metrics(
            calibrated_probs(logits, card.temperature), y_va, card.classes
        )
        if val_samples is not None and len(val_samples) == len(y_va):
            groups = group_metrics(val_samples, logits.argmax(1), y_va)
    card.metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(seconds, 1),
        "val": {
            k: val_metrics[k]
            for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "ece", "n_images")
            if k in val_metrics
        },
    }
    atomic_write_text(run / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    training_curves(history, run / "curves.png")
    write_model_card(run, card, val_metrics, groups)
    save_checkpoint(run, model, card)  # last: a sidecar with metrics marks the run finished
    val_acc = val_metrics.get("accuracy")
    acc = f", validation accuracy {val_acc:.3f}" if val_acc is not None else ""
    info(f"best epoch {best_epoch}{acc}, temperature {card.temperature:.2f}; run saved to {run}")
    return TrainResult(run, card, history, best_epoch, val_metrics)


def fit_rejection_rule(
    run: Path,
    model: nn.Module,
    loop: Loop,
    train_data: ArrayData,
    logits: np.ndarray,
    val_features: np.ndarray,
    card: ModelCard,
    cfg: TrainConfig,
) -> dict[str, Any]:
    """Fit the not-target threshold on validation; for knn, store the training features."""
    if cfg.rejection_score != "knn":
        return fit_rejection(
            Outputs(logits), card.temperature, cfg.rejection_recall, cfg.rejection_score
        )
    _, train_features = collect_features(model, lambda: in_order(train_data), loop.forward)
    bank = make_bank(train_features, cfg.seed)
    save_bank(run, bank)
    k = min(cfg.knn_k or auto_k(len(bank)), len(bank))
    knn = knn_scores(val_features, stored_bank(bank), k)
    rule = fit_rejection(Outputs(logits, knn), card.temperature, cfg.rejection_recall, "knn")
    return rule | {"k": k, "bank": BANK_FILE, "bank_size": len(bank), "feature_dim": bank.shape[1]}


def _data_record(data: LabelledData, failures: list[str]) -> dict[str, Any]:
    return {
        "root": str(Path(data.root).resolve()),
        "layout": data.layout,
        "labels_file": str(Path(data.labels_file).resolve()) if data.labels_file else None,
        "fingerprint": data.fingerprint(),
        "n_images": len(data.samples),
        "n_patients": len(data.patients),
        "unreadable": failures,
        "dropped": data.dropped,
        "unknown": data.unknown,
    }


def _counts(counts: dict[str, int]) -> str:
    """'Other: 3, Maternal cervix: 2' (never a Python dict repr in a message)."""
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def _print_plan(
    data: LabelledData, split: Split, cfg: TrainConfig, device: torch.device, run: Path
) -> None:
    counts = split_counts(data, split)
    info(
        f"data: {data.root} ({data.layout}), preset {data.preset}, "
        f"{plural(len(data.samples), 'image')} of {plural(len(data.patients), 'patient')}"
    )
    for name in ("train", "val", "test"):
        per = ", ".join(f"{c}: {n}" for c, n in counts[name].items())
        info(f"  {name:5s} {plural(len(split.of(name)), 'patient'):>12s} | {per}")
    if data.dropped:
        info(f"  dropped (not in preset {data.preset}): {_counts(data.dropped)}")
    if data.unknown:
        warn(f"unknown labels ignored: {_counts(data.unknown)}")
    if data.missing:
        warn(f"{plural(len(data.missing), 'listed image')} not found (e.g. {data.missing[0]})")
    info(
        f"model {cfg.model} ({_start_of(cfg)}), "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, device {device}; run folder {run}"
    )


def _start_of(cfg: TrainConfig) -> str:
    """How the weights start, in words, for the plan printed before training."""
    if cfg.weights:
        return f"from {cfg.weights}"
    spec = get_spec(cfg.model)
    if cfg.pretrained and spec.pretrained and not spec.needs_weights:
        return f"pretrained: {spec.pretrained}"
    return "from scratch"


def _print_epoch(row: dict[str, Any], improved: bool, progress: bool) -> None:
    if not progress:
        return
    val = (
        f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}"
        if "val_loss" in row
        else ""
    )
    star = " *" if improved else ""
    info(
        f"epoch {row['epoch']:3d}: train loss {row['train_loss']:.4f} acc "
        f"{row['train_accuracy']:.3f}{val} | {row['images_per_s']:.0f} img/s{star}"
    )
