"""CUDA paths: training with bf16 autocast and channels-last, augmentation on the device,
and inference on the GPU agreeing with the CPU. Run by `scripts/gpu_check.sh` on a GPU
machine; every test skips with the reason on a machine without CUDA."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="no CUDA GPU here (torch.cuda.is_available() is False)"),
]
GPU_FAST = dict(model="efficientnet_lite0", img_size=(224, 224), epochs=2, batch_size=32,
                lr=1e-3, seed=0, workers=0, device="cuda", amp=True, channels_last=True)


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory, "gpu", per_class=24, fmt="seed", seed=5)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory: pytest.TempPathFactory, gpu_data: Path) -> Path:
    from fetalplanes.engine.train import TrainConfig, train

    out = tmp_path_factory.mktemp("cudarun") / "run"
    train(gpu_data, config=TrainConfig(**GPU_FAST), out=out, progress=False)
    return out


def test_trainer_bf16_channels_last_on_cuda(gpu_data: Path, tmp_path: Path) -> None:
    from fetalplanes.engine.train import TrainConfig, Trainer

    trainer = Trainer(gpu_data, config=TrainConfig(**GPU_FAST), out=tmp_path / "run",
                      progress=False).setup()
    assert trainer.device.type == "cuda" and trainer.loop.amp and trainer.loop.channels_last
    assert all(p.is_cuda for p in trainer.model.parameters())
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = trainer.train_data.batch(torch.arange(4))
    with torch.no_grad():
        trainer.model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            raw = trainer.model(trainer.loop.inputs(x))
    assert raw.dtype == torch.bfloat16  # autocast is really on
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    rows = [trainer.epoch() for _ in range(2)]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["images_per_s"] > 0
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2  # the steps really updated the weights
    result = trainer.finish()
    assert (result.run / "weights.safetensors").is_file()
    assert result.card.training["device"].startswith("cuda")


def test_batch_augment_runs_on_the_device() -> None:
    from fetalplanes.data.transforms import BatchAugment, get_augment

    cfg = get_augment("origin")
    assert cfg is not None
    x = torch.randint(0, 256, (16, 1, 64, 80), dtype=torch.uint8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    out = BatchAugment(cfg, gen)(x)
    assert out.is_cuda and out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    assert not torch.equal(out, x.float())  # something moved
    again = BatchAugment(cfg, torch.Generator().manual_seed(0))(x.cpu())
    torch.testing.assert_close(out.cpu(), again, atol=0.5, rtol=0)  # same draws as on CPU


def test_predictor_on_cuda_agrees_with_cpu(cuda_run: Path, gpu_data: Path) -> None:
    from fetalplanes.inference.predictor import Predictor

    files = sorted((gpu_data / "images").glob("*.png"))[:24]
    on_gpu = Predictor.from_run(cuda_run, device="cuda")
    on_cpu = Predictor.from_run(cuda_run, device="cpu")
    assert on_gpu.backend.device.type == "cuda" and on_cpu.backend.device.type == "cpu"
    assert next(on_gpu.backend.net.parameters()).is_cuda
    a = list(on_gpu.predict_paths(files, progress=False))
    b = list(on_cpu.predict_paths(files, progress=False))
    assert all(p.ok for p in a + b)
    pa = np.array([[p.probs[c] for c in on_gpu.classes] for p in a])
    pb = np.array([[p.probs[c] for c in on_cpu.classes] for p in b])
    np.testing.assert_allclose(pa, pb, atol=5e-3)  # cuDNN convolutions may use TF32
    agree = np.mean([x.label == y.label for x, y in zip(a, b, strict=True)])
    assert agree >= 0.95  # near-ties may flip under TF32 matmuls


def test_evaluate_on_cuda(cuda_run: Path, tmp_path: Path) -> None:
    from fetalplanes.engine.evaluate import evaluate
    from fetalplanes.inference.predictor import Predictor

    predictor = Predictor.from_run(cuda_run, device="cuda")
    m = evaluate(cuda_run, out=tmp_path / "ev", progress=False, predictor=predictor).metrics
    assert m["n_images"] > 0 and 0 <= m["accuracy"] <= 1
