"""`fetalplanes bench` and `fetalplanes cache` through the CLI, plus the memory sampler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fetalplanes.cli import app as main_app
from fetalplanes.tools.bench import (
    BenchOptions,
    BenchReport,
    MemorySampler,
    Row,
    make_plan,
    process_tree,
)

EXPECTED = [
    "model_torch_img_s",
    "predict_torch_b1_img_s",
    "predict_torch_b64_img_s",
    "latency_torch_p50_ms",
    "latency_torch_p95_ms",
    "stage_decode_ms",
    "stage_crop_ms",
    "stage_resize_ms",
    "stage_model_torch_ms",
    "cache_fill_img_s",
    "cache_hit_img_s",
    "train_cache_img_s",
    "train_png_img_s",
]
EXPECTED_ONNX = [
    "onnx_export_s",
    "model_onnx_img_s",
    "predict_onnx_b1_img_s",
    "predict_onnx_b64_img_s",
    "latency_onnx_p50_ms",
    "latency_onnx_p95_ms",
    "stage_model_onnx_ms",
    "sort_img_s",
    "sort_peak_mb",
    "sort_main_rss_mb",
]


@pytest.fixture()
def app() -> typer.Typer:
    return main_app


def test_commands_registered_on_the_main_cli() -> None:
    names = {c.name for c in main_app.registered_commands}
    assert {"export", "bench", "cache"} <= names


@pytest.mark.slow
def test_bench_quick_writes_json(app: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--img-size", "64", "--json", str(out), "--quiet"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "240"})  # no wrapped row labels
    assert res.exit_code == 0, res.output
    assert "load average" in res.output and "ultrasound crop" in res.output
    d = json.loads(out.read_text())
    assert {"machine", "options", "load_average", "results", "rows", "targets"} <= set(d)
    assert d["machine"]["cores"] >= 1 and d["machine"]["cpu"]
    assert len(d["load_average"]["start"]) == 3
    expected = EXPECTED + (EXPECTED_ONNX if d["machine"]["onnxruntime"] else [])
    missing = [k for k in expected if k not in d["results"]]
    assert not missing, missing
    assert all(v > 0 for v in d["results"].values()), d["results"]
    assert {t["key"] for t in d["targets"]} <= set(d["results"])
    assert all(isinstance(t["met"], bool) for t in d["targets"])


def test_bench_refuses_cuda_without_gpu(app: typer.Typer) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test checks the error shown without one")
    res = CliRunner().invoke(app, ["bench", "--device", "cuda", "--quick"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.output


def test_cache_command_reports_hits(app: typer.Typer, folders_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(folders_data, data)
    bad_dir = next(p for p in sorted(data.iterdir()) if p.is_dir())
    (bad_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    n = sum(1 for p in data.rglob("*.png"))
    args = ["cache", str(data), "--model", "seed-cnn", "--img-size", "32"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"{n} images" in first.output and f"0 cache hits, {n - 1} decoded" in first.output
    assert "1 unreadable" in first.output and "broken.png" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert f"{n - 1} cache hits, 0 decoded" in second.output


def test_plan_sizes() -> None:
    quick, full = make_plan(BenchOptions(quick=True)), make_plan(BenchOptions())
    assert quick.images < full.images and full.batches == (1, 64)
    assert make_plan(BenchOptions(device="cuda")).batches[-1] == 256
    assert make_plan(BenchOptions(images=100, rss_images=10_000)).rss_images == 10_000


def test_targets_met_and_missed() -> None:
    rep = BenchReport({}, {"device": "cpu"})
    rep.rows = [
        Row("predict_onnx_b64_img_s", "x", "onnx/cpu", 64, 90.0, "img/s"),
        Row("latency_onnx_p50_ms", "x", "onnx/cpu", 1, 25.0, "ms"),
    ]
    met = {t["key"]: t["met"] for t in rep.targets()}
    assert met == {"predict_onnx_b64_img_s": True, "latency_onnx_p50_ms": False}
    assert BenchReport({}, {"device": "cuda"}, rep.rows).targets() == []


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux /proc")
def test_memory_sampler_sees_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        assert child.pid in process_tree(os.getpid())
        with MemorySampler() as mem:
            pass
        assert mem.peak_mb > 10 and mem.peak_rss_mb >= mem.peak_mb
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_zero_shot_rows_measure_the_bundled_model_against_a_plain_loop() -> None:
    """`bench --only zero-shot`: end to end per backend, one image, memory, scan, baseline."""
    from fetalplanes.tools.bench import BenchOptions
    from fetalplanes.tools.zero_shot_bench import run_zero_shot

    report = run_zero_shot(BenchOptions(quick=True, images=6), progress=False)
    res = report.results
    for key in ("zero_shot_onnx_img_s", "zero_shot_torch_img_s", "zero_shot_onnx_peak_mb",
                "zero_shot_onnx_one_image_s", "zero_shot_plain_loop_img_s", "zero_shot_speedup",
                "scan_fps", "scan_steady_fps"):
        assert res[key] > 0, key
    assert {t["key"] for t in report.targets()} >= {"zero_shot_onnx_img_s", "scan_fps"}
