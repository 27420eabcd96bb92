"""Hyperparameter search with Optuna: TPE sampling, median pruning on validation loss.

Every trial trains on the same patient split and is scored on its validation patients
only, so the test patients stay untouched for the final `evaluate`. The objective is the
validation NLL *after* temperature scaling, which compares label-smoothing settings
fairly (smoothing makes raw probabilities under-confident, temperature undoes that).
Trials are pruned on the raw per-epoch validation loss that `train` reports through its
`on_epoch` callback. The result is `OUT/best_config.json`, which `train --config` takes.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalplanes.console import info, warn
from fetalplanes.data.datasets import LabelledData, Split, load_dataset, split_by_patient
from fetalplanes.engine.train import TrainConfig, next_run_dir, resolve_run_dir, train
from fetalplanes.errors import FetalPlanesError

DEFAULT_MODELS = ("efficientnet_lite0", "seed-cnn")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched; the rest of the configuration comes from the base config."""

    models: tuple[str, ...] = DEFAULT_MODELS
    lr: tuple[float, float] = (1e-4, 3e-3)  # log scale
    weight_decay: tuple[float, float] = (1e-4, 0.1)  # log scale
    augment_strength: tuple[float, float] = (0.0, 1.5)
    label_smoothing: tuple[float, float] = (0.0, 0.2)
    max_freeze_epochs: int = 2


@dataclass
class TuneResult:
    out: Path
    best_config: TrainConfig
    best_value: float
    study: Any


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise FetalPlanesError("tuning needs Optuna: pip install 'fetalplanes[tune]'") from None
    return optuna


def suggest(trial: Any, space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """One point of the search space as TrainConfig changes."""
    params: dict[str, Any] = {
        "model": trial.suggest_categorical("model", list(space.models)),
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "augment_strength": trial.suggest_float("augment_strength", *space.augment_strength),
        "label_smoothing": trial.suggest_float("label_smoothing", *space.label_smoothing),
    }
    max_freeze = min(space.max_freeze_epochs, max(0, base.epochs - 1))
    params["freeze_epochs"] = trial.suggest_int("freeze_epochs", 0, max_freeze)
    return params


class SizeCheck:
    """Does a model accept the base config's --img-size? A model that cannot (e.g. too
    small for its downsampling) trains at its own size instead of failing mid-study."""

    def __init__(self, size: tuple[int, int] | None):
        self.size = size
        self._known: dict[str, bool] = {}

    def fits(self, model: str) -> bool:
        if self.size is None:
            return True
        if model not in self._known:
            self._known[model] = _forward_ok(model, self.size)
            if not self._known[model]:
                warn(f"{model} does not accept input size {self.size}; tuning it at its own size")
        return self._known[model]


def _forward_ok(model: str, size: tuple[int, int]) -> bool:
    import torch

    from fetalplanes.models import create_model

    net = create_model(model, 2, pretrained=False, input_size=size).eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, *size))
    except (RuntimeError, ValueError):
        return False
    return True


def trial_config(base: TrainConfig, params: dict[str, Any], sizes: SizeCheck) -> TrainConfig:
    """Base config with a trial's parameters (and no size override a model can't take)."""
    d = base.to_dict() | params
    if not sizes.fits(params["model"]):
        d["img_size"] = None
    return TrainConfig.from_dict(d)


def _pruning_callback(trial: Any, optuna: Any) -> Callable[[int, dict[str, Any]], None]:
    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        if "val_loss" not in row:
            return
        trial.report(float(row["val_loss"]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    return on_epoch


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    from fetalplanes.console import err

    before, err.quiet = err.quiet, True
    try:
        yield
    finally:
        err.quiet = before


def supports_on_epoch() -> bool:
    """Whether `train` can call back after each epoch (needed to prune during training)."""
    return "on_epoch" in inspect.signature(train).parameters


def make_objective(
    data: LabelledData,
    split: Split,
    base: TrainConfig,
    space: SearchSpace,
    trials_dir: Path,
    optuna: Any,
) -> Callable[[Any], float]:
    """Objective: calibrated validation NLL of one training run."""
    sizes = SizeCheck(base.img_size)
    live = supports_on_epoch()

    def objective(trial: Any) -> float:
        cfg = trial_config(base, suggest(trial, space, base), sizes)
        run = trials_dir / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", str(run))
        kw = {"on_epoch": _pruning_callback(trial, optuna)} if live else {}
        with _quiet_console():  # one line per trial instead of each run's plan and summary
            result = train(data=data, split=split, config=cfg, out=run, progress=False, **kw)
        if not live:  # report afterwards so later trials can still be pruned against it
            for row in result.history:
                if "val_loss" in row:
                    trial.report(float(row["val_loss"]), int(row["epoch"]))
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("val_accuracy", result.val_metrics.get("accuracy"))
        trial.set_user_attr("temperature", result.card.temperature)
        trial.set_user_attr("config", cfg.to_dict())
        return float(result.val_metrics["loss"])

    return objective


def tune(
    data_root: str | Path | None = None,
    *,
    base: TrainConfig | None = None,
    trials: int = 20,
    timeout: float | None = None,
    out: str | Path | None = None,
    space: SearchSpace | None = None,
    labels: str | Path | None = None,
    preset: str = "seed4",
    data: LabelledData | None = None,
    progress: bool = True,
) -> TuneResult:
    """Search hyperparameters; writes OUT/best_config.json, OUT/trials.csv, OUT/trials/."""
    optuna = _require_optuna()
    base = base or TrainConfig()
    space = space or SearchSpace()
    if trials < 1:
        raise FetalPlanesError(f"--trials must be at least 1, got {trials}")
    if data is None:
        if data_root is None:
            raise FetalPlanesError("tune needs a data folder")
        data = load_dataset(data_root, labels, preset)
    split = split_by_patient(data.samples, base.val_fraction, base.test_fraction, base.seed)
    if not split.val:
        raise FetalPlanesError(
            "tuning needs validation patients; use more patients or a larger val_fraction"
        )
    out_dir = next_run_dir(Path("runs") / "tune", "study") if out is None else Path(out)
    resolve_run_dir(out_dir, "study")  # refuses a non-empty folder
    study = _study(optuna, base.seed, trials)
    objective = make_objective(data, split, base, space, out_dir / "trials", optuna)
    info(
        f"tuning {trials} trials on {len(split.train)} training / {len(split.val)} validation "
        f"patients of {data.root}; models {', '.join(space.models)}; writing to {out_dir}"
    )
    from fetalplanes.console import progress as progress_bar

    with progress_bar(total=trials, desc="trials", unit="trial", disable=not progress) as bar:
        study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[_report(bar)])
    return _finish(study, out_dir)


def _study(optuna: Any, seed: int, trials: int) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, trials // 3)))
    # judge no trial before 3 have finished, nor on its first (warm-up) epoch: steps are
    # 1-based epochs and the pruner looks only at steps >= n_warmup_steps
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    return optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)


def _report(bar: Any) -> Callable[[Any, Any], None]:
    """After each trial: advance the bar and print its result."""

    def callback(study: Any, trial: Any) -> None:
        bar.update(1)
        bar.write(f"trial {trial.number}: {_outcome(trial)} ({_short(trial.params)})", sys.stderr)

    return callback


def _outcome(trial: Any) -> str:
    if trial.state.name == "COMPLETE":
        return f"{trial.value:.4f}"
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        return f"pruned after epoch {max(trial.intermediate_values)}"
    return trial.state.name.lower()


def _short(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _finish(study: Any, out: Path) -> TuneResult:
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise FetalPlanesError("no trial finished (all pruned or failed); allow more time")
    best = study.best_trial
    best_cfg = TrainConfig.from_dict(best.user_attrs["config"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_config.json").write_text(json.dumps(best_cfg.to_dict(), indent=2) + "\n")
    write_trials_csv(study.trials, out / "trials.csv")
    info(
        f"best trial {best.number}: calibrated validation loss {best.value:.4f} "
        f"({_short(best.params)})"
    )
    info(
        f"wrote {out / 'best_config.json'} (use: fetalplanes train DATA --config it) "
        f"and {out / 'trials.csv'}"
    )
    return TuneResult(out, best_cfg, float(best.value), study)


def write_trials_csv(trials: Sequence[Any], path: Path) -> None:
    """One row per trial: state, objective (finished trials), parameters, run folder."""
    names = sorted({k for t in trials for k in t.params})
    attrs = ("best_epoch", "val_accuracy", "temperature", "run")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "epochs_reported", "seconds", *names, *attrs])
        for t in trials:
            done = t.state.name == "COMPLETE"
            seconds = t.duration.total_seconds() if t.duration is not None else None
            w.writerow(
                [
                    t.number,
                    t.state.name,
                    f"{t.value:.6f}" if done else "",
                    len(t.intermediate_values),
                    "" if seconds is None else f"{seconds:.1f}",
                    *(t.params.get(n, "") for n in names),
                    *(t.user_attrs.get(a, "") for a in attrs),
                ]
            )
