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
from fetalplanes.models.registry import create_model
from fetalplanes.models.weights import load_safetensors


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


def load_checkpoint(run: str | Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model of a run folder in eval mode on CPU."""
    folder = run_folder(run)
    card = load_card(folder)
    model = create_model(
        card.architecture, len(card.classes), pretrained=False, input_size=card.preprocess.size
    )
    wpath = folder / WEIGHTS
    if not os.path.lexists(wpath) and os.access(folder, os.X_OK):
        raise CheckpointError(
            f"{wpath}: weights missing (training interrupted before the first epoch finished?)"
        )
    state = load_safetensors(wpath)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{wpath}: does not match {card.architecture} ({first})") from None
    return model.eval(), card
