"""Checkpoints: safetensors weights beside the JSON sidecar (`models.card`).

Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fetalplanes.errors import CheckpointError
from fetalplanes.models.card import (  # noqa: F401 (the run-folder API in one place)
    BANK_FILE,
    SIDECAR,
    WEIGHTS,
    ModelCard,
    load_card,
    run_folder,
    save_card,
    umask_mode,
)
from fetalplanes.models.registry import MAX_PARAMETERS, create_model, get_spec, parameter_count
from fetalplanes.models.weights import check_finite, load_safetensors


def save_checkpoint(run: Path, model: nn.Module, card: ModelCard) -> None:
    """Write weights then sidecar, each atomically."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = unshare(state)
    tmp = run / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"architecture": card.architecture})
    umask_mode(tmp)  # readable by colleagues as the umask allows (safetensors writes 0600)
    os.replace(tmp, run / WEIGHTS)
    save_card(run, card)


def unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; clone duplicates."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def check_architecture(folder: Path, card: ModelCard) -> None:
    """The sidecar's architecture is known and of a size fetalplanes builds, checked before
    anything is allocated; each problem is one line naming `model.json`."""
    sidecar = folder / SIDECAR
    try:
        get_spec(card.architecture)
    except CheckpointError as exc:
        raise CheckpointError(f"{sidecar}: {exc}") from None
    n = parameter_count(card.architecture, len(card.classes), card.preprocess.size)
    if n is not None and n > MAX_PARAMETERS:
        raise CheckpointError(
            f"{sidecar}: architecture {card.architecture} has {n:,} parameters, over the "
            f"{MAX_PARAMETERS:,} a run folder may have; refusing to build it"
        )


def load_checkpoint(run: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model of a run folder in eval mode on CPU.

    Validated before anything big is built: the sidecar (`load_card`: class names, sizes),
    the architecture (known, at most `MAX_PARAMETERS`, counted on the meta device); then
    the weights (shapes, and no NaN or infinite value)."""
    folder = run_folder(run)
    card = load_card(folder)
    check_architecture(folder, card)
    wpath = folder / WEIGHTS
    if not os.path.lexists(wpath) and os.access(folder, os.X_OK):
        raise CheckpointError(
            f"{wpath}: weights missing (training interrupted before the first epoch finished?)"
        )
    state = load_safetensors(wpath)
    model = create_model(
        card.architecture, len(card.classes), pretrained=False, input_size=card.preprocess.size
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{wpath}: does not match {card.architecture} ({first})") from None
    check_finite(state, wpath, "weights file")
    return model.eval(), card
