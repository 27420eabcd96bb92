"""Prediction and sorting on a Ray cluster: the same results as the local engine, more cores.

Why: one machine sorts a few hundred images a second; an archive of millions wants many
machines. `RayPredictor.stream` is the engine's loop (`Predictor.stream`) with Ray as the
executor, so `sort_images`, `predict` and every other sink use it unchanged: the journal,
the atomic copies (`sorting.safe_copy`) and resuming stay on the driver, exactly as in a
local sort.

The pipeline (Ray Data), per block of items:

1. decode -> crop -> resize as stateless tasks (`map_batches(decode_batch)`), with the
   same code and error messages as the local decode workers (`data.loading.prepare_item`);
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

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalplanes.data.loading import Batch, prepare_item
from fetalplanes.data.preprocess import Preprocess
from fetalplanes.data.sources import Item
from fetalplanes.errors import FetalPlanesError
from fetalplanes.inference.model_ref import ModelRef
from fetalplanes.inference.outputs import Outputs
from fetalplanes.inference.predictor import Engine, Predictor, Result
from fetalplanes.inference.results import Prediction

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


def load_actor_model(spec: ModelRef, threads: int) -> Predictor:
    """The model an actor runs, limited to `threads` CPU threads (its share of the node)."""
    pred = spec.load()
    _limit_threads(pred, threads)
    return pred


#: Kept for callers of fetalplanes 0.2: the recipe an actor loads is the model spec itself.
ModelRecipe = ModelRef


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
PASSED = ("index", "error", "spacing", "notes")


def decode_batch(batch: dict[str, np.ndarray], pp: Preprocess) -> dict[str, np.ndarray]:
    """Task: read and prepare each item as the local decode workers do (`prepare_item`);
    an unreadable one becomes its one-line error."""
    items = list(batch["item"])
    n = len(items)
    pixels = np.zeros((n, *pp.size), np.uint8)
    spacing = np.full((n, 2), np.nan, np.float64)
    errors, notes = [], []
    for i, item in enumerate(items):
        done = prepare_item(item, pp)
        if done.array is not None:
            pixels[i] = done.array
        if done.meta.get("pixel_spacing_mm") is not None:
            spacing[i] = done.meta["pixel_spacing_mm"]
        errors.append(done.error or "")
        notes.append("\n".join(done.meta.get("notes") or ()))
    return {"index": batch["index"], "pixels": pixels, "error": np.array(errors, dtype=object),
            "spacing": spacing, "notes": np.array(notes, dtype=object)}


def _fault_point(calls: int) -> None:
    """See FAULT_ENV (tests only): die like a crashed or OOM-killed worker would."""
    spec = os.environ.get(FAULT_ENV, "")
    nth, _, marker = spec.partition(":")
    if nth.isdigit() and calls == int(nth) and marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


class ModelActor:
    """Actor: one model per actor process, loaded once, run on every batch it is given."""

    def __init__(self, recipe: ModelRef, threads: int, n_classes: int):
        self.predictor = load_actor_model(recipe, threads)
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


def bound_actor(recipe: ModelRef, threads: int, n_classes: int) -> type[ModelActor]:
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


class RayPredictor(Engine):
    """The engine's loop on Ray: same items in, same `Prediction`s out (in input order when
    `ordered`), so every sink (predict, sort, scan ...) uses it like a local predictor.

    `predictor` is the driver's copy (class names, calibration, rejection); `spec` tells
    each actor how to load its own (`ModelRef`, paths made absolute). `address` is a Ray
    cluster (`auto`, or `HOST:PORT` of `ray start --head`); None starts a private local
    instance, which ends with the stream. An already connected driver (`ray.init`) is used
    as it is.
    """

    def __init__(
        self,
        predictor: Predictor,
        spec: ModelRef,
        address: str | None = None,
        actors: int | None = None,
        ordered: bool = True,
    ):
        self.predictor = predictor
        self.recipe = spec.absolute()
        self.address = address
        self.actors = actors
        self.ordered = ordered
        self.pp = predictor.pp
        self.classes = predictor.classes
        self.card = predictor.card
        from fetalplanes.inference.onnx import OnnxBackend

        self.torch_model = not isinstance(predictor.backend, OnnxBackend)  # GPU actors

    # what sinks and the CLI read and set on a predictor
    @property
    def output_classes(self) -> list[str]:
        return self.predictor.output_classes

    @property
    def min_confidence(self) -> float:
        return self.predictor.min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        self.predictor.min_confidence = value

    def stream(
        self,
        items: Iterable[Item],
        *,
        batch_size: int = 64,
        workers: int | None = None,
        expected: int | None = None,
        progress: bool = False,
        keep_outputs: bool = False,
        hold: Any = None,
        pool: Any = None,
        desc: str = "classifying",
    ) -> Iterator[Result]:
        """Results as the cluster returns them (`workers` is Ray's to choose)."""
        from fetalplanes.console import progress as progress_bar

        todo = list(items)
        if not todo:
            return
        remote = [_absolute(it) for it in todo]  # actors elsewhere do not share our cwd
        ray = ray_module()
        owned = _connect(ray, self.address)
        bar = progress_bar(total=len(todo), desc=desc, unit="img", disable=not progress,
                           smoothing=0.1)
        seen: set[int] = set()
        quiet = logging.getLogger("ray.data")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # no per-run notes between our results
        try:
            ds = self._pipeline(ray, remote, max(1, batch_size))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ready = self._results(batch, todo, remote, keep_outputs)
                fresh = [i for i in sorted(ready) if i not in seen]  # never an image twice
                seen.update(fresh)
                bar.update(len(fresh))
                for i in fresh:
                    yield Result(todo[i], ready[i])
            if len(seen) != len(todo):
                raise FetalPlanesError(
                    f"the Ray pipeline returned {len(seen)} of {len(todo)} images; "
                    "run it again (finished images are kept by sort)"
                )
        finally:
            bar.close()
            quiet.setLevel(level)
            if owned:
                ray.shutdown()

    def _pipeline(self, ray: Any, items: list[Item], batch_size: int) -> Any:
        plan = plan_actors(ray.cluster_resources(), self.torch_model, self.actors)
        rows = block_rows(len(items), ray.cluster_resources().get("CPU", 1), batch_size)
        blocks = math.ceil(len(items) / rows)
        table = [{"index": i, "item": it} for i, it in enumerate(items)]
        ds = ray.data.from_items(table, override_num_blocks=blocks)
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
        self, batch: dict[str, np.ndarray], items: list[Item], remote: list[Item],
        keep_outputs: bool,
    ) -> dict[int, Prediction]:
        """The driver's predictions for one returned batch, by input index: the same
        `Predictor.classify` a local chunk goes through, names as the caller gave them."""
        index = [int(i) for i in batch["index"]]
        chunk = [items[i] for i in index]
        errors = [str(e).replace(remote[i].path or "\0", items[i].path or "\0", 1) if e else ""
                  for i, e in zip(index, batch["error"], strict=True)]
        ok = [r for r, e in enumerate(errors) if not e]
        has = np.asarray(batch["has_score"])[ok]
        outs = Outputs(np.asarray(batch["logits"])[ok],
                       np.asarray(batch["score"])[ok] if len(ok) and has.all() else None)
        meta = []
        for r in ok:
            spacing = np.asarray(batch["spacing"][r])
            notes = str(batch["notes"][r] or "")
            meta.append({
                "pixel_spacing_mm": None if np.isnan(spacing).any()
                else (float(spacing[0]), float(spacing[1])),
                "notes": tuple(n for n in notes.split("\n") if n),
            })
        prepared = Batch(ok, np.zeros((len(ok), 0, 0), np.uint8), [""] * len(ok),
                         [(r, e) for r, e in enumerate(errors) if e], outputs=outs, meta=meta)
        preds = self.predictor.classify(chunk, prepared, keep_outputs)
        return dict(zip(index, preds, strict=True))


def _absolute(item: Item) -> Item:
    """The item with its file path made absolute (actors on other nodes)."""
    if item.path is None:
        return item
    return dataclasses.replace(item, path=os.path.abspath(item.path))


#: Ray starts its workers at nice 15 so that a driver stays responsive; on a machine with any
#: other busy process they then get a small share of the CPU (the Ray tests ran ~20x slower
#: beside two busy loops). A local instance we start runs them at normal priority; the
#: variable set by the user wins, and a cluster keeps its own setting.
WORKER_NICENESS = ("RAY_worker_niceness", "0")


def _connect(ray: Any, address: str | None) -> bool:
    """Join (or start) Ray; True when this call started it and so must shut it down."""
    if ray.is_initialized():
        return False
    if address is None:  # a local instance: its workers do the whole job
        os.environ.setdefault(*WORKER_NICENESS)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FetalPlanesError(f"cannot start or reach {where} ({first})") from None
    return True


#: Seconds to wait for a Ray cluster's address to answer before saying it cannot be reached.
ADDRESS_TIMEOUT_S = 5.0


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse in one line, within `timeout_s`, an --address whose HOST:PORT does not accept
    connections (Ray itself would retry for a minute). `auto` is left to Ray."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FetalPlanesError(f"--address {address}: give HOST:PORT (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise FetalPlanesError(f"cannot reach the Ray cluster at {address} ({why.lower()})") \
            from None
