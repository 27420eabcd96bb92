"""Frictions a new user met (issue 18, item 7; issue 22, item 4), each fixed and kept fixed.

Each test names what went wrong before: a busy port that started anyway, a bench step that
ran a module that no longer exists, exit 0 with nothing to do, help text eaten by markup,
carriage-return bars in CI logs, Swagger UI from a CDN, a sideways JPEG classified sideways,
`export sononet16` refused, and a deprecated option that said nothing.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need_shared, shared_dir
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.console import cli_command
from fetalplanes.errors import FetalPlanesError

runner = CliRunner()
FRAMES = shared_dir() / "sononet" / "example_images"


def _png(folder: Path, name: str = "scan.png", value: int = 90) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(value).integers(0, 255, (60, 80), dtype=np.uint8)
    Image.fromarray(arr).save(folder / name)
    return folder / name


# ------------------------------------------------------------------ nothing to do: exit 1
@pytest.mark.parametrize("command", ["predict", "sort", "scan", "evaluate"])
def test_no_input_images_is_exit_1_and_one_line(command: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "predict": ["predict", "sononet16", str(empty)],
        "sort": ["sort", "sononet16", str(empty), str(tmp_path / "out")],
        "scan": ["scan", "sononet16", str(empty)],
        "evaluate": ["evaluate", "sononet16", str(empty)],
    }[command]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(empty) in lines[0]
    assert not (tmp_path / "out").exists()  # sort made no output folder for nothing


# ------------------------------------------------------------------ serve on a busy port
def test_serve_on_a_busy_port_is_one_line_before_startup(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(cli_command("serve", "sononet16", "--port", str(port)),
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert lines == [f"error: port {port} is in use on 127.0.0.1; pass --port with a free "
                     "port (or stop the other server)"]


# ------------------------------------------------------------------ subprocess command lines
def test_every_subprocess_command_line_is_built_by_cli_command() -> None:
    """`python -m fetalplanes.cli` broke `bench` once: command lines of our own CLI are built
    in one place, and that place's line runs."""
    import fetalplanes

    root = Path(fetalplanes.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r'"-m",\s*"fetalplanes', p.read_text()) and p.name != "console.py"]
    assert offenders == []
    out = subprocess.run(cli_command("--version"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("fetalplanes ")


@pytest.mark.slow
def test_the_bench_sort_step_runs(tmp_path: Path) -> None:
    """The full bench's last step (a sort in its own process, for the memory row)."""
    from test_faults import make_tiny_run

    from fetalplanes.tools.bench import sort_command

    run = make_tiny_run(tmp_path / "run")
    for i in range(3):
        _png(tmp_path / "in", f"scan{i}.png", i)
    cmd = sort_command(run, tmp_path / "in", tmp_path / "out", "torch")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3


# ------------------------------------------------------------------ help, progress, docs
def test_help_text_is_shown_as_written() -> None:
    r = runner.invoke(app, ["predict", "--help"])
    assert "pip install 'fetalplanes[ray]'" in " ".join(r.output.split())
    r = runner.invoke(app, ["bench", "--help"])
    assert "about a minute" in " ".join(r.output.split())


def test_progress_without_a_terminal_is_one_line_per_phase() -> None:
    frames = need_shared(FRAMES)
    out = subprocess.run(cli_command("predict", "sononet16", str(frames), "--format", "csv"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    assert re.fullmatch(r"classifying: 13 img in [0-9.]+ s \([0-9.]+ img/s\)\n", out.stderr)


def test_api_docs_work_offline() -> None:
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.serving import create_app

    client = TestClient(create_app(Predictor.load("sononet16")))
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.split("<body")[0]
    asset = client.get("/docs-assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN: not offered


# ------------------------------------------------------------------ models and options
def test_export_takes_the_model_grammar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="export needs torch: pip install 'fetalplanes[train]'")
    pytest.importorskip("onnx", reason="export needs onnx: pip install 'fetalplanes[onnx]'")
    from fetalplanes.inference.predictor import Predictor

    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["export", "sononet16"])
    assert r.exit_code == 0, r.output
    assert "wrote sononet16.onnx" in r.output and (tmp_path / "sononet16.onnx").is_file()
    again = runner.invoke(app, ["export", "sononet16"])
    assert again.exit_code == 2 and "never overwrites" in again.output
    frames = need_shared(FRAMES)
    ours = Predictor.load(str(tmp_path / "sononet16.onnx")).predict([frames], workers=0)
    bundled = Predictor.load("sononet16").predict([frames], workers=0)
    assert [p.label for p in ours] == [p.label for p in bundled]


def test_arch_options_and_the_deprecated_model_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from fetalplanes.cli.options import arch_of

    for command in ("train", "crossval", "cache", "bench", "demo"):
        text = " ".join(runner.invoke(app, [command, "--help"]).output.split())
        assert "--arch" in text and "--model" not in text, command
    assert arch_of("seed-cnn", None) == "seed-cnn"
    assert arch_of(None, "seed-cnn") == "seed-cnn"
    assert "--model for an architecture is deprecated; use --arch seed-cnn" in \
        capsys.readouterr().err


def test_train_refuses_missing_start_weights_before_reading_images(
    seed_data: Path, tmp_path: Path
) -> None:
    r = runner.invoke(app, ["train", str(seed_data), "--arch", "sononet32", "--out",
                            str(tmp_path / "run"), "-q"])
    assert r.exit_code == 2
    assert "sononet32 has no pretrained weights on this machine" in r.output
    assert "from scratch)" not in r.output and "decoding" not in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "5", "2", "-0.1", "inf"])
def test_min_confidence_must_be_a_probability(value: str, tmp_path: Path) -> None:
    r = runner.invoke(app, ["predict", "sononet16", str(_png(tmp_path)),
                            "--min-confidence", value])
    assert r.exit_code == 2 and "between 0 and 1" in r.output


@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_size_must_be_positive(value: str, tmp_path: Path) -> None:
    r = runner.invoke(app, ["sort", "sononet16", str(tmp_path), str(tmp_path / "o"),
                            "--batch-size", value])
    assert r.exit_code == 2 and "--batch-size" in r.output and "Traceback" not in r.output


def test_a_dead_ray_address_is_refused_at_once() -> None:
    from fetalplanes.inference.ray_engine import check_address

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetalPlanesError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(FetalPlanesError, match="HOST:PORT"):
        check_address("nonsense")


# ------------------------------------------------------------------ EXIF orientation
def test_a_sideways_jpeg_with_exif_orientation_is_read_upright() -> None:
    """A JPEG stored sideways with Orientation=6 (every viewer shows it upright) was
    classified rotated (thorax 0.99999 upright, not_target 0.79 as stored)."""
    from fetalplanes.data.images import decode_image
    from fetalplanes.inference.predictor import Predictor

    upright = Image.open(need_shared(FRAMES) / "4CH.png").convert("RGB")
    plain, turned = io.BytesIO(), io.BytesIO()
    upright.save(plain, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(turned, "JPEG", quality=95,
                                                      exif=exif.tobytes())
    a = decode_image(plain.getvalue(), "upright.jpg")
    b = decode_image(turned.getvalue(), "sideways.jpg")
    assert a.shape == b.shape == (735, 975)
    assert np.abs(a.astype(int) - b).mean() < 2  # the same picture (JPEG noise aside)
    pred = Predictor.load("sononet16")
    got = pred.predict_bytes([("upright.jpg", plain.getvalue()),
                              ("sideways.jpg", turned.getvalue())])
    assert got[0].label == got[1].label == "Fetal thorax"
    assert abs(got[0].confidence - got[1].confidence) < 0.01


# ------------------------------------------------------------------ heat maps
@pytest.mark.slow
def test_heat_maps_for_the_bundled_model_with_the_torch_backend() -> None:
    """The page's note says `serve sononet16 --backend torch` gives heat maps: it does."""
    pytest.importorskip("torch", reason="heat maps need torch")
    pytest.importorskip("pytorch_grad_cam", reason="heat maps need grad-cam")
    from fetalplanes.inference.predictor import Predictor
    from fetalplanes.serving import create_app

    onnx = TestClient(create_app(Predictor.load("sononet16")))
    reason = onnx.get("/api/v1/model").json()["explain"]["reason"]
    assert "--backend torch" in reason
    client = TestClient(create_app(Predictor.load("sononet16", backend="torch")))
    data = (need_shared(FRAMES) / "FEMUR.png").read_bytes()
    r = client.post("/api/v1/predict?explain=true", files=[("files", ("f.png", data))])
    result = r.json()["results"][0]
    assert r.status_code == 200 and result["heatmap"] and not result.get("heatmap_error")


def test_subprocess_python_is_this_interpreter() -> None:
    assert cli_command("x")[:3] == [sys.executable, "-m", "fetalplanes"]


def test_a_frame_folder_skips_its_bad_frames_with_a_line_each(tmp_path: Path) -> None:
    """One unreadable frame refused the whole sweep; now it is skipped and named."""
    frames = tmp_path / "frames"
    for i in range(6):
        _png(frames, f"f{i}.png", i)
    (frames / "f3.png").write_bytes(b"not a png at all")
    r = runner.invoke(app, ["scan", "sononet16", str(frames), "--out", str(tmp_path / "out"),
                            "--window", "1"])
    assert r.exit_code == 0, r.output
    skipped = [line for line in r.output.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "f3.png" in skipped[0]
    assert "5 frames scanned" in r.output
    rows = (tmp_path / "out" / "timeline.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and not any("f3.png" in row for row in rows)
