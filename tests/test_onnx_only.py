"""Inference without torch: the bundled SonoNet-16 ONNX file (and any exported .onnx) runs
predict, sort and serve with torch never imported, and agrees with the torch model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, need_shared, shared_dir

pytestmark = pytest.mark.slow  # real frames and subprocesses: CI lane

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install .[onnx]")

FRAMES = shared_dir() / "sononet" / "example_images"
HEADS = shared_dir() / "hc18-sample"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_predict_with_the_bundled_model_never_imports_torch(tmp_path: Path) -> None:
    frames = need_shared(FRAMES)
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from fetalplanes.cli import app\n"
        f"r = CliRunner().invoke(app, ['predict', 'sononet16', {str(frames)!r}, '--format',"
        " 'json', '-q'])\n"
        f"s = CliRunner().invoke(app, ['sort', 'sononet16', {str(frames)!r},"
        f" {str(tmp_path / 'sorted')!r}, '-q'])\n"
        "print(json.dumps({'rc': [r.exit_code, s.exit_code], 'torch': 'torch' in sys.modules,"
        " 'n': len(json.loads(r.stdout))}))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"rc": [0, 0], "torch": False, "n": 13}, got


def test_cli_audit_with_the_bundled_model_never_imports_torch(tmp_path: Path) -> None:
    frames = need_shared(FRAMES)
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from fetalplanes.cli import app\n"
        f"r = CliRunner().invoke(app, ['audit', {str(frames)!r}, '--out',"
        f" {str(tmp_path / 'audit')!r}, '-q'])\n"
        "print(json.dumps({'rc': r.exit_code, 'torch': 'torch' in sys.modules}))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False}
    assert (tmp_path / "audit" / "example_images" / "report.html").is_file()


def test_server_app_with_the_bundled_model_never_imports_torch() -> None:
    pytest.importorskip("fastapi", reason="fastapi not installed: pip install .[serve]")
    code = (
        "import sys\n"
        "from fetalplanes.inference.predictor import Predictor\n"
        "from fetalplanes.serving import create_app\n"
        "app = create_app(Predictor.load('sononet16'))\n"
        "print('torch' in sys.modules)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_shipped_onnx_agrees_with_the_torch_model() -> None:
    from fetalplanes.data.images import list_images
    from fetalplanes.inference.predictor import Predictor

    files = list_images([need_shared(FRAMES), need_shared(HEADS)])
    onnx = Predictor.load("sononet16", backend="onnx")
    torch_model = Predictor.load("sononet16", backend="torch")
    assert type(onnx.backend).__name__ == "OnnxBackend"
    a = list(onnx.predict_paths(files, workers=0))
    b = list(torch_model.predict_paths(files, workers=0))
    assert [p.label for p in a] == [p.label for p in b]
    worst = max(abs(p.probs[c] - q.probs[c]) for p, q in zip(a, b, strict=True) for c in p.probs)
    assert worst < 1e-4
    pa = np.array([p.model_confidence for p in a])
    assert np.all(np.isfinite(pa))


def test_shipped_int8_model_keeps_every_label() -> None:
    """The int8 copy (calibrated on synthetic phantoms only) gives the fp32 labels on the
    real frames; its probabilities move by at most ~0.1."""
    from fetalplanes.data.images import list_images
    from fetalplanes.inference.predictor import Predictor

    files = list_images([need_shared(FRAMES), need_shared(HEADS)])
    fp32 = list(Predictor.load("sononet16", backend="onnx").predict_paths(files, workers=0))
    int8 = list(Predictor.load("sononet16", backend="onnx-int8").predict_paths(files, workers=0))
    assert [p.label for p in int8] == [p.label for p in fp32]
    assert [p.model_label for p in int8] == [p.model_label for p in fp32]
    worst = max(abs(p.probs[c] - q.probs[c]) for p, q in zip(fp32, int8, strict=True)
                for c in p.probs)
    assert worst < 0.15
