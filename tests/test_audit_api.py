"""`POST /api/v1/audit` (and the checklist and model-card GETs): real frames and a sweep
uploaded to `fetalplanes serve sononet16`, folded to the checklist's 13 views per request;
the answer is checklist.json of `fetalplanes audit` plus thumbnails and timelines."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicomfiles import SHARED, SONONET_REGION, write_dicom
from fastapi.testclient import TestClient
from PIL import Image
from test_audit import _sweep

from fetalplanes.inference.predictor import Predictor
from fetalplanes.serving import ServeSettings, create_app
from fetalplanes.serving.audit import AUDIT, AuditResponse

pytestmark = pytest.mark.slow  # real frames through the network

EXAMPLES = SHARED / "sononet" / "example_images"


class NoHeatmaps:
    available = False
    reason = "not needed for audits"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    if not EXAMPLES.is_dir():
        pytest.skip(f"real frames not found at {EXAMPLES}: set FETALPLANES_SHARED to shared/")
    predictor = Predictor.load("sononet16")  # served as seed4, the default preset
    with TestClient(create_app(predictor, ServeSettings(), NoHeatmaps())) as c:
        yield c


def post(client: TestClient, files: list[tuple[str, bytes]], **params: Any) -> Any:
    return client.post(AUDIT, params=params,
                       files=[("files", (n, d, "application/octet-stream")) for n, d in files])


def example(stem: str) -> tuple[str, bytes]:
    return f"{stem}.png", (EXAMPLES / f"{stem}.png").read_bytes()


def test_checklists_and_model_card(client):
    body = client.get("/api/v1/checklists").json()
    assert body["default"] == "isuog-mid-trimester"
    isuog = next(c for c in body["checklists"] if c["name"] == "isuog-mid-trimester")
    assert len(isuog["assessed"]) == 13 and len(isuog["items"]) > 13
    seed = next(c for c in body["checklists"] if c["name"] == "seed4-planes")
    assert seed["assessed"] == ["abdomen", "brain", "femur", "thorax"]
    card = client.get("/api/v1/model/card").json()
    assert card["name"] == "sononet16" and "not a medical device" in card["not_medical_device"]


def test_images_dicom_and_a_sweep_are_one_study(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip = _sweep([("BRAIN-CB", 8), ("blank", 3), ("FEMUR", 8)], 10.0, tmp_path / "s.mp4")
    frame = np.asarray(Image.open(EXAMPLES / "KIDNEYS.png").convert("RGB"))
    dcm = write_dicom(tmp_path / "k.dcm", [frame], regions=[(*SONONET_REGION, 0.03, 0.03)],
                      transfer_syntax="explicit")
    files = [example("4CH"), example("LVOT"), ("kidneys.dcm", dcm.read_bytes()),
             ("sweep.mp4", clip.read_bytes())]
    for p in (clip, dcm):
        p.unlink()
    r = post(client, files)
    assert r.status_code == 200, r.text
    body = r.json()
    AuditResponse.model_validate(body)
    assert body["checklist"]["name"] == "isuog-mid-trimester"
    assert body["model"]["preset"] == "views13"  # folded for the request
    assert set(body["present"]) == {
        "Four-chamber view (situs, axis, size)", "Left ventricular outflow tract", "Kidneys",
        "Trans-cerebellar plane (cerebellum, cisterna magna)", "Femur (FL)"}
    items = {i["id"]: i for i in body["items"]}
    assert items["femur"]["best"]["source"] == "sweep.mp4"
    assert 1.1 - 0.01 <= items["femur"]["best"]["time_s"] <= 1.8 + 0.01
    assert items["abdomen-kidneys"]["best"]["source"] == "kidneys.dcm"
    assert set(body["thumbnails"]) == {i for i, it in items.items() if it["present"]}
    png = Image.open(io.BytesIO(base64.b64decode(body["thumbnails"]["heart-4ch"])))
    assert max(png.size) == 320
    (timeline,) = body["timelines"]
    assert timeline["source"] == "sweep.mp4" and timeline["frames"] == 19
    assert {r["label"] for r in timeline["runs"] if r["status"] == "view"} == {
        "Trans-cerebellar plane", "Femur length plane"}
    assert [s["source"] for s in body["stills"]] == ["4CH.png", "LVOT.png", "kidneys.dcm"]
    assert body["study"]["operator"] is None  # the server keeps no salt: no pseudonyms
    assert os.listdir(tmp_path) == []  # nothing written


def test_seed4_checklist_and_errors(client):
    r = post(client, [example("FEMUR")], checklist="seed4-planes")
    assert r.status_code == 200
    assert r.json()["present"] == ["Fetal femur"] and r.json()["model"]["preset"] == "seed4"
    bad = post(client, [example("FEMUR")], checklist="../../etc/passwd")
    assert bad.status_code == 400 and "unknown checklist" in bad.json()["detail"]
    assert post(client, [example("FEMUR")], window=4).status_code == 400
    junk = post(client, [("notes.png", b"not an image at all")])
    assert junk.status_code == 415 and "notes.png" in junk.json()["detail"]
    mixed = post(client, [example("FEMUR"), ("notes.png", b"nope")])
    assert mixed.status_code == 200 and len(mixed.json()["failures"]) == 1


def test_a_run_model_gets_the_checklist_it_can_assess(tmp_path: Path):
    """A four-plane model cannot assess ISUOG's views: seed4-planes is its default."""
    from test_serve_schema import tiny_predictor

    with TestClient(create_app(tiny_predictor(), ServeSettings(), NoHeatmaps())) as c:
        assert c.get("/api/v1/checklists").json()["default"] == "seed4-planes"
        r = c.post(AUDIT, params={"checklist": "isuog-mid-trimester"},
                   files=[("files", ("a.png", b"x", "image/png"))])
        assert r.status_code == 400 and "names none of these views" in r.json()["detail"]
