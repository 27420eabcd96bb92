"""Heat maps for the web app, from `fetalplanes.inference.explain` when that module is installed.

The server must run without it (heat maps are an optional extra), so availability is
detected once at start-up and every failure becomes a per-file message, never a 500.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from fetalplanes.data.images import decode_image


class Explainer(Protocol):
    """Makes a heat-map overlay PNG for one uploaded image."""

    available: bool
    reason: str | None  # why heat maps are unavailable, for the page and the API

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes: ...


def one_line(exc: BaseException) -> str:
    """`Type: message` on a single line, for JSON errors."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ModuleExplainer:
    """Uses `fetalplanes.inference.explain.heatmap` and `overlay_png` if they can be imported."""

    def __init__(self, module: str = "fetalplanes.inference.explain"):
        self.available = False
        self.reason: str | None = None
        self._heatmap: Any = None
        self._overlay: Any = None
        try:
            mod = importlib.import_module(module)
            self._heatmap, self._overlay = mod.heatmap, mod.overlay_png
        except ModuleNotFoundError as exc:
            if exc.name == module:
                self.reason = f"this version of fetalplanes has no {module} module"
            else:
                self.reason = (
                    f"{exc.name or 'a dependency'} is not installed "
                    "(pip install 'fetalplanes[explain]')"
                )
        except Exception as exc:  # a broken optional module must not stop the server
            self.reason = f"heat maps are not available ({one_line(exc)})"
        else:
            self.available = True

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes:
        if not self.available:
            raise RuntimeError(self.reason)
        gray = decode_image(data, name)
        heat = self._heatmap(predictor, gray, target)
        return bytes(self._overlay(predictor.pp.prepare_array(gray), heat))


class NoExplainer:
    """Heat maps switched off, saying why (the web page shows the reason)."""

    available = False

    def __init__(self, reason: str):
        self.reason: str | None = reason

    def overlay(self, predictor: Any, data: bytes, name: str, target: int | None) -> bytes:
        raise RuntimeError(self.reason)


def explainer_for(predictor: Any) -> Any:
    """Grad-CAM for torch models; for ONNX Runtime models no heat maps, and no torch import
    (an ONNX-only install must serve without torch)."""
    backend = predictor.backend
    if getattr(backend, "net", None) is None and getattr(backend, "members", None) is None:
        return NoExplainer(
            "heat maps need gradients, which ONNX Runtime does not give; serve this model "
            "with --backend torch for them (it needs torch: pip install 'fetalplanes[train]')"
        )
    return ModuleExplainer()
