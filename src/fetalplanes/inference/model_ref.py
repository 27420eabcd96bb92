"""The model argument of every command, resolved in one place.

A model is named the same way everywhere (predict, sort, scan, explain, evaluate, serve,
export, bench, listen, audit, and the Ray actors): a **run folder** (or a folder of runs,
which is an ensemble), an exported **.onnx file** (its card travels in the metadata), or a
**pretrained name** (`sononet16`, bundled; `fetalplanes models` lists them), with
`--weights` for a pretrained name's own weights file, `--backend` for how it runs, `--tta`
and `--ensemble` for more runs averaged in. `ModelRef` holds that argument; `kind` says
which of the three it is and `load()` builds the `Predictor`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fetalplanes.errors import FetalPlanesError

if TYPE_CHECKING:
    from fetalplanes.inference.predictor import Predictor

#: `auto`: ONNX Runtime for a bundled pretrained model (no torch needed), torch for runs.
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
#: One sentence for every --help that takes a model.
GRAMMAR = ("a run folder (or a folder of runs: an ensemble), an exported .onnx file, or a "
           "pretrained name (sononet16 is bundled; `fetalplanes models` lists them)")


@dataclass(frozen=True)
class ModelRef:
    """A model argument and the options that go with it."""

    model: str
    weights: str | None = None
    preset: str = "seed4"
    backend: str = "auto"
    tta: bool = False
    ensemble: tuple[str, ...] = ()
    device: str = "auto"
    min_confidence: float = 0.5

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise FetalPlanesError(
                f"unknown backend {self.backend!r}; choose {', '.join(BACKENDS)}"
            )

    @property
    def kind(self) -> str:
        """'ensemble', 'run', 'onnx' or 'pretrained' (a name that is none of them is
        reported by `load` with what is ready)."""
        path = Path(self.model)
        if self.ensemble:
            return "ensemble"
        if path.is_dir():
            from fetalplanes.inference.ensemble import is_ensemble_dir

            return "ensemble" if is_ensemble_dir(path) else "run"
        if path.suffix == ".onnx":
            return "onnx"
        return "pretrained"

    @property
    def torch_backend(self) -> bool:
        """Whether `load()` runs the network with torch (GPU actors, Grad-CAM)."""
        kind = self.kind
        if kind == "ensemble":
            return True
        if kind == "onnx":
            return False
        if kind == "run":
            return self.backend in ("auto", "torch")
        return self.backend == "torch" or self.weights is not None

    def check_name(self) -> None:
        """One line for a model argument that is neither an existing file or folder nor a
        registered name (a path that does not exist, a typo)."""
        from fetalplanes.models.registry import get_spec, pretrained_names

        if self.kind != "pretrained":
            return
        path = Path(self.model)
        try:
            get_spec(self.model)
        except FetalPlanesError:
            ready = ", ".join(pretrained_names()) or "none"
            where = " (no such file or folder)" if "/" in self.model or path.suffix else ""
            raise FetalPlanesError(
                f"{self.model}: not a run folder, an .onnx file or a pretrained model name"
                f"{where}; ready: {ready}"
            ) from None

    def with_(self, **changes: object) -> ModelRef:
        return replace(self, **changes)  # type: ignore[arg-type]

    def absolute(self) -> ModelRef:
        """The same spec with file paths made absolute: processes elsewhere (Ray actors on
        other nodes) do not share this working folder."""

        def where(p: str) -> str:
            return str(Path(p).resolve()) if Path(p).exists() else p

        return replace(
            self,
            model=where(self.model),
            weights=where(self.weights) if self.weights else None,
            ensemble=tuple(where(p) for p in self.ensemble),
        )

    def load(self) -> Predictor:
        """The predictor this spec names (one line naming the problem otherwise)."""
        from fetalplanes.inference.predictor import Predictor

        kind = self.kind
        if self.ensemble or kind == "ensemble":
            if self.backend not in ("auto", "torch"):
                raise FetalPlanesError(f"{self.model}: ensembles run on the torch backend only")
            runs = [Path(self.model), *(Path(p) for p in self.ensemble)]
            return Predictor.from_ensemble(runs, device=self.device, tta=self.tta,
                                           min_confidence=self.min_confidence)
        return Predictor.load(self.model, self.weights, self.preset, self.backend,
                              device=self.device, tta=self.tta,
                              min_confidence=self.min_confidence)

    def describe(self) -> str:
        """Short human name: the model as given, with its weights and backend."""
        extra = [f"weights {self.weights}"] if self.weights else []
        extra += [] if self.backend == "auto" else [self.backend]
        extra += [f"+ {len(self.ensemble)} runs"] if self.ensemble else []
        return self.model + (f" ({', '.join(extra)})" if extra else "")
