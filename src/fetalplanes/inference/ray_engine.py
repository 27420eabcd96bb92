"""Prediction and sorting on a Ray cluster: the same results as the local engine, more cores.

Why: one machine sorts a few hundred images a second; an archive of millions wants many
machines. `RayPredictor` is a drop-in for `Predictor.predict_paths` (the one streaming
path), so `sort_images` and `predict` use it unchanged: the journal, the atomic copies
(`sorting.safe_copy`) and resuming stay on the driver, exactly as in a local sort.

The pipeline (Ray Data), per block of file paths:

1. decode -> crop -> resize as stateless tasks (`map_batches(decode_batch)`), with the
   same code and error messages as the local decode workers (`data.loading.PathDataset`);
2. the network in an actor pool (`map_batches(ModelActor, compute=ActorPoolStrategy(...))`):
   each actor loads its own model once (torch or ONNX Runtime; CPU actors, or one GPU per actor for
   torch on a GPU cluster) and returns raw outputs (logits and the model's score);
3. the driver turns outputs into `Prediction`s with the driver's own `Predictor.results`
   (calibration, rejection, folding: the local code), so both engines agree to float
   precision.

Faults: a model actor that dies is restarted and its batch retried (Ray Data's actor
pool defaults: `max_restarts=-1`, `max_task_retries=-1`); the driver keeps each image's
first result only and checks that every input came back, so nothing is lost or
duplicated. Ray stays an optional extra: it is imported
only here, inside functions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.dicom import parse_frame_name
from fetalplanes.data.loading import PathDataset
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.outputs import Outputs
from fetalplanes.inference.predictor import Predictor
from fetalplanes.inference.results import Prediction, failed

INSTALL = "pip install 'fetalplanes[ray]'"
#: Rows per input block: small enough to spread over the cluster and stream results,
#: large enough that 10 million paths are ~10,000 blocks, not millions.
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 64, 4096
#: Test-only fault injection: "N:MARKER" makes a model actor exit hard (os._exit) on its
#: Nth batch when MARKER does not exist, creating MARKER first, so the restarted actor
#: carries on (tests/test_ray_engine.py).
FAULT_ENV = "FETALPLANES_FAULT_ACTOR_EXIT"


def ray_module() -> Any:
    """The `ray` package with Ray Data, or one line saying how to get it."""
    try:
        import ray
        import ray.data  # the extra, not just the core
    except ImportError:
        raise FetalPlanesError(f"the Ray engine needs ray[data]: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class ModelRecipe:
    """How each actor loads its own copy of the model (the paths must be readable on every
    node, like the images): the same grammar as `Predictor.load`."""

    model: str
    weights: str | None = None
    preset: str = "seed4"
    backend: str = "torch"
    tta: bool = False
    ensemble: tuple[str, ...] = ()

    def load(self, threads: int) -> Predictor:
        """The model, limited to `threads` CPU threads (its actor's share of the node)."""
        if self.ensemble:
            pred = Predictor.from_ensemble([self.model, *self.ensemble], tta=self.tta)
        else:
            pred = Predictor.load(self.model, self.weights, self.preset, self.backend,
                                  tta=self.tta)
        _limit_threads(pred, threads)
        return pred


def _limit_threads(pred: Predictor, threads: int) -> None:
    """An actor owns `threads` cores, not the whole node: oversubscribed math is slower."""
    from fetalplanes.inference.onnx import OnnxBackend

    if isinstance(pred.backend, OnnxBackend):
        pred.backend = OnnxBackend(pred.backend.path, pred.backend.tta, threads=threads)
    else:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------ pipeline stages
#: Columns that travel from the decode tasks through the actors back to the driver.
PASSED = ("index", "error", "frame", "spacing")


def decode_batch(batch: dict[str, np.ndarray], pp: Preprocess) -> dict[str, np.ndarray]:
    """Task: read and prepare each item (a file or `file.dcm#frame=N`) as the local decode
    workers do; an unreadable one becomes its one-line error."""
    names = [str(p) for p in batch["path"]]
    items = PathDataset(names, pp)  # type: ignore[arg-type]  # item names, as predict_paths
    n = len(names)
    pixels = np.zeros((n, *pp.size), np.uint8)
    frame = np.full(n, -1, np.int64)
    spacing = np.full((n, 2), np.nan, np.float64)
    errors = []
    for i in range(n):
        item = items[i]
        if item.array is not None:
            pixels[i] = item.array
        meta = getattr(item, "meta", {}) or {}
        if meta.get("frame") is not None:
            frame[i] = int(meta["frame"])
        if meta.get("pixel_spacing_mm") is not None:
            spacing[i] = meta["pixel_spacing_mm"]
        errors.append(item.error or "")
    return {"index": batch["index"], "pixels": pixels, "error": np.array(errors, dtype=object),
            "frame": frame, "spacing": spacing}


def _fault_point(calls: int) -> None:
    """See FAULT_ENV (tests only): die like a crashed or OOM-killed worker would."""
    spec = os.environ.get(FAULT_ENV, "")
    nth, _, marker = spec.partition(":")
    if nth.isdigit() and calls == int(nth) and marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


class ModelActor:
    """Actor: one model per actor process, loaded once, run on every batch it is given."""

    def __init__(self, recipe: ModelRecipe, threads: int, n_classes: int):
        self.predictor = recipe.load(threads)
        self.n_classes = n_classes
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        _fault_point(self.calls)
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(ok)
        logits = np.zeros((n, self.n_classes), np.float32)
        score = np.zeros(n, np.float32)
        has_score = np.zeros(n, bool)
        if ok.any():
            out = self.predictor.outputs(np.asarray(batch["pixels"])[ok])
            logits[ok] = out.logits
            if out.score is not None:
                score[ok], has_score[ok] = out.score, True
        passed = {k: batch[k] for k in PASSED}
        return passed | {"logits": logits, "score": score, "has_score": has_score}


def bound_actor(recipe: ModelRecipe, threads: int, n_classes: int) -> type[ModelActor]:
    """`ModelActor` with its arguments inside the class: Ray ships the class by value, so
    a restarted actor never depends on constructor arguments held in the object store."""

    class BoundModelActor(ModelActor):
        def __init__(self) -> None:
            super().__init__(recipe, threads, n_classes)

    return BoundModelActor


# ------------------------------------------------------------------ the driver
@dataclass(frozen=True)
class Plan:
    """How many model actors, and what each one holds."""

    actors: int
    cpus: float
    gpus: float


def plan_actors(resources: dict[str, float], torch_model: bool, actors: int | None = None) -> Plan:
    """One actor per GPU for a torch model on a GPU cluster (decode tasks on the CPUs);
    otherwise one single-threaded actor per CPU: with equal resources Ray fuses the decode
    step into the actors, so each core decodes and classifies its own blocks, the layout
    that is fastest on one machine too (`Predictor.predict_paths` with ONNX workers)."""
    gpus = int(resources.get("GPU", 0))
    if gpus and torch_model:
        return Plan(actors or gpus, 1.0, 1.0)
    return Plan(actors or max(1, int(resources.get("CPU", 1))), 1.0, 0.0)


def block_rows(n: int, cpus: float, batch_size: int) -> int:
    """Rows per input block: ~4 blocks per core, clamped (see MIN/MAX_BLOCK_ROWS)."""
    rows = math.ceil(n / max(1.0, 4 * cpus))
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, batch_size, rows)))


class RayPredictor:
    """`Predictor.predict_paths` on Ray: same arguments, same `Prediction`s (in input order
    when `ordered`), so `sort_images` and the CLI use it like a local predictor.

    `predictor` is the driver's copy (class names, calibration, rejection); `recipe`
    tells each actor how to load its own. `address` is a Ray cluster (`auto`, or
    `HOST:PORT` of `ray start --head`); None starts a private local instance, which
    ends with the stream. An already connected driver (`ray.init`) is used as it is.
    """

    def __init__(
        self,
        predictor: Predictor,
        recipe: ModelRecipe,
        address: str | None = None,
        actors: int | None = None,
        ordered: bool = True,
    ):
        self.predictor = predictor
        self.recipe = recipe
        self.address = address
        self.actors = actors
        self.ordered = ordered
        self.pp = predictor.pp
        self.classes = predictor.classes
        self.card = predictor.card
        from fetalplanes.inference.onnx import OnnxBackend

        self.torch_model = not isinstance(predictor.backend, OnnxBackend)  # GPU actors

    # what sort_images and the CLI read and set on a predictor
    @property
    def output_classes(self) -> list[str]:
        return self.predictor.output_classes

    @property
    def min_confidence(self) -> float:
        return self.predictor.min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        self.predictor.min_confidence = value

    def predict(self, inputs: Sequence[str | Path], **kw: Any) -> list[Prediction]:
        """Files and folders (each frame of a cine loop is an item) -> predictions."""
        from fetalplanes.data.loading import list_items

        return list(self.predict_paths(list_items(inputs), **kw))

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int | None = None,
        progress: bool = False,
        keep_outputs: bool = False,
        desc: str = "classifying",
    ) -> Iterator[Prediction]:
        """Stream predictions as the cluster returns them (`workers` is Ray's to choose)."""
        from tqdm import tqdm

        paths = [str(p) for p in paths]  # files, or `file.dcm#frame=N` items
        if not paths:
            return
        where = [os.path.abspath(p) for p in paths]  # actors elsewhere do not share our cwd
        ray = ray_module()
        owned = _connect(ray, self.address)
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, smoothing=0.1)
        seen: set[int] = set()
        quiet = logging.getLogger("ray.data")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # no per-run notes between our results
        try:
            ds = self._pipeline(ray, where, max(1, batch_size))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ready = self._results(batch, paths, where, keep_outputs)
                fresh = [i for i in sorted(ready) if i not in seen]  # never an image twice
                seen.update(fresh)
                bar.update(len(fresh))
                for i in fresh:
                    yield ready[i]
            if len(seen) != len(paths):
                raise FetalPlanesError(
                    f"the Ray pipeline returned {len(seen)} of {len(paths)} images; "
                    "run it again (finished images are kept by sort)"
                )
        finally:
            bar.close()
            quiet.setLevel(level)
            if owned:
                ray.shutdown()

    def _pipeline(self, ray: Any, paths: list[str], batch_size: int) -> Any:
        plan = plan_actors(ray.cluster_resources(), self.torch_model, self.actors)
        rows = block_rows(len(paths), ray.cluster_resources().get("CPU", 1), batch_size)
        blocks = math.ceil(len(paths) / rows)
        items = [{"index": i, "path": p} for i, p in enumerate(paths)]
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds.context.execution_options.preserve_order = self.ordered
        ds.context.enable_progress_bars = False
        ds = ds.map_batches(
            decode_batch, fn_kwargs={"pp": self.pp}, batch_size=batch_size,
            batch_format="numpy", num_cpus=1,
        )
        actor = bound_actor(self.recipe, max(1, int(plan.cpus)), len(self.classes))
        return ds.map_batches(
            actor, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(plan.actors, blocks)),
            num_cpus=plan.cpus, num_gpus=plan.gpus,
        )

    def _results(
        self, batch: dict[str, np.ndarray], paths: list[str], where: list[str],
        keep_outputs: bool,
    ) -> dict[int, Prediction]:
        """The driver's predictions for one returned batch, by input index (what
        `Predictor.predict_paths` makes of a local batch, names as the caller gave them)."""
        index = [int(i) for i in batch["index"]]
        errors = [str(e).replace(where[i], paths[i], 1) if e else ""
                  for i, e in zip(index, batch["error"], strict=True)]
        ready = {i: failed(paths[i], e, parse_frame_name(paths[i])[1])
                 for i, e in zip(index, errors, strict=True) if e}
        ok = np.array([not e for e in errors], dtype=bool)
        if ok.any():
            has = np.asarray(batch["has_score"])[ok]
            outs = Outputs(np.asarray(batch["logits"])[ok],
                           np.asarray(batch["score"])[ok] if has.all() else None)
            rows = np.flatnonzero(ok)
            preds = self.predictor.results([paths[index[r]] for r in rows], outs, keep_outputs)
            for r, pred in zip(rows, preds, strict=True):
                frame, spacing = int(batch["frame"][r]), np.asarray(batch["spacing"][r])
                pred.frame = None if frame < 0 else frame
                pred.pixel_spacing_mm = (None if np.isnan(spacing).any()
                                         else (float(spacing[0]), float(spacing[1])))
                ready[index[r]] = pred
        return ready


def _connect(ray: Any, address: str | None) -> bool:
    """Join (or start) Ray; True when this call started it and so must shut it down."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FetalPlanesError(f"cannot start or reach {where} ({first})") from None
    return True
