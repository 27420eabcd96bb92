"""The exam checklist: shipped data, the views13 preset and the pure evaluation
(synthetic observations; no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fetalplanes.data.datasets import VIEWS13, get_preset
from fetalplanes.models.sononet_classes import (
    NOT_TARGET,
    SONONET_LABELS,
    SONONET_TO_VIEW,
    fold_probabilities,
)
from fetalplanes.workflows.checklist import (
    MISSING,
    NOT_ASSESSED,
    PRESENT,
    Checklist,
    ChecklistError,
    Observation,
    builtin_checklists,
    evaluate_checklist,
    load_checklist,
)


def test_views13_preset_names_every_sononet_view_once():
    preset = get_preset("views13")
    assert preset.classes == VIEWS13 and len(VIEWS13) == 13
    assert set(SONONET_TO_VIEW) == set(SONONET_LABELS)
    views = [v for v in SONONET_TO_VIEW.values() if v != NOT_TARGET]
    assert sorted(views) == sorted(VIEWS13)  # a bijection: 13 labels <-> 13 views
    assert SONONET_TO_VIEW["Background"] == NOT_TARGET


def test_fold_into_views13_moves_each_label_to_its_view():
    eye = np.eye(14, dtype=np.float32)  # one-hot: each SonoNet label alone
    folded, names = fold_probabilities(eye, VIEWS13)
    assert names == [*VIEWS13, NOT_TARGET]
    got = [names[i] for i in folded.argmax(1)]
    assert got == [SONONET_TO_VIEW[label] for label in SONONET_LABELS]
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(14), size=4).astype(np.float32)
    folded, _ = fold_probabilities(probs, VIEWS13)
    np.testing.assert_allclose(folded.sum(1), 1.0, atol=1e-6)
    background = SONONET_LABELS.index("Background")
    np.testing.assert_allclose(folded[:, -1], probs[:, background], rtol=1e-6)


def test_shipped_checklists_load_and_name_known_views():
    assert {"isuog-mid-trimester", "seed4-planes"} <= set(builtin_checklists())
    isuog = load_checklist("isuog-mid-trimester")
    assert isuog.preset == "views13" and "Ultrasound Obstet Gynecol" in isuog.source["citation"]
    assert set(isuog.views) == set(VIEWS13)  # every model view serves one ISUOG item
    assert sum(1 for i in isuog.items if i.views) == 13
    assert any(not i.views for i in isuog.items)  # and some the model cannot assess
    seed = load_checklist("seed4-planes")
    assert set(seed.views) == set(get_preset("seed4").classes)


def test_checklist_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("{not json")
    with pytest.raises(ChecklistError, match=r"list\.json: not valid JSON"):
        load_checklist(bad)
    bad.write_text(json.dumps({"name": "x", "items": [{"id": "a", "name": "A"},
                                                      {"id": "a", "name": "B"}]}))
    with pytest.raises(ChecklistError, match="ids repeat: a"):
        load_checklist(bad)
    with pytest.raises(ChecklistError, match="unknown checklist"):
        load_checklist("no-such-list")
    with pytest.raises(ChecklistError, match=r"absent\.json: "):
        load_checklist(tmp_path / "absent.json")


SMALL = Checklist.from_dict({
    "name": "small", "preset": "seed4", "items": [
        {"id": "brain", "name": "Brain", "views": ["Fetal brain"]},
        {"id": "heart", "name": "Heart", "views": ["Fetal thorax", "Heart view"]},
        {"id": "femur", "name": "Femur", "views": ["Fetal femur"]},
        {"id": "orbits", "name": "Orbits", "views": []},
        {"id": "extra", "name": "Extra", "views": ["Nothing this model has"]},
        {"id": "opt", "name": "Optional abdomen", "views": ["Fetal abdomen"], "required": False},
    ]})
MODEL = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]


def _video(labels: list[str], conf: list[float], source: str = "a.mp4", fps: float = 10,
           **flags: list[bool]) -> list[Observation]:
    return [Observation(source, lab, c, frame=i, time_s=i / fps,
                        **{k: v[i] for k, v in flags.items()})
            for i, (lab, c) in enumerate(zip(labels, conf, strict=True))]


def test_present_missing_and_not_assessed():
    obs = _video(["Fetal brain", "Fetal brain", "not_target", "Fetal thorax"],
                 [0.7, 0.9, 0.8, 0.6], not_target=[False, False, True, False])
    res = evaluate_checklist(SMALL, obs, MODEL)
    status = {r.item.id: r.status for r in res.items}
    assert status == {"brain": PRESENT, "heart": PRESENT, "femur": MISSING,
                      "orbits": NOT_ASSESSED, "extra": NOT_ASSESSED, "opt": MISSING}
    assert res.present == ["Brain", "Heart"] and res.missing == ["Femur"]  # opt: not required
    assert res.not_assessed == ["Orbits", "Extra"]
    assert res.assessed == 3 and res.completeness == pytest.approx(2 / 3)
    brain = res.item("brain")
    assert (brain.best.frame, brain.best.confidence, brain.frames) == (1, 0.9, 2)
    assert (brain.first.time_s, brain.last.time_s) == (0.0, 0.1)
    d = res.to_dict()
    assert d["summary"] == {"assessed": 3, "present": 2, "missing": 1, "not_assessed": 2,
                            "complete": False, "completeness": 0.6667}
    orbits = next(i for i in d["items"] if i["id"] == "orbits")
    assert orbits["assessed"] == "not assessed by this model" and orbits["best"] is None
    assert json.loads(json.dumps(d)) == d


def test_uncertain_and_rejected_frames_do_not_count_but_are_counted():
    obs = _video(["Fetal femur"] * 3, [0.95, 0.4, 0.45], uncertain=[True, True, True])
    res = evaluate_checklist(SMALL, obs, MODEL)
    femur = res.item("femur")
    assert femur.status == MISSING and femur.best is None
    assert femur.frames == 0 and femur.uncertain_frames == 3


def test_best_frame_prefers_frames_the_model_accepted_then_confidence():
    obs = _video(["Fetal brain"] * 4, [0.99, 0.80, 0.85, 0.85],
                 frame_rejected=[True, False, False, False])
    best = evaluate_checklist(SMALL, obs, MODEL).item("brain").best
    assert (best.frame, best.confidence) == (2, 0.85)  # the tie keeps the earlier frame
    only_rejected = _video(["Fetal brain"], [0.99], frame_rejected=[True])
    assert evaluate_checklist(SMALL, only_rejected, MODEL).item("brain").best.frame == 0


def test_any_of_several_views_and_several_sources():
    stills = [Observation("scan1.png", "Fetal thorax", 0.8),
              Observation("scan2.png", "Heart view", 0.97)]
    clip = _video(["Fetal thorax", "Fetal thorax"], [0.9, 0.91], source="sweep.mp4")
    res = evaluate_checklist(SMALL, [*stills, *clip], [*MODEL, "Heart view"])
    heart = res.item("heart")
    assert heart.best.source == "scan2.png" and heart.best.label == "Heart view"
    assert heart.best.frame is None and heart.best.time_s is None
    assert heart.frames == 4 and heart.sources == ["scan1.png", "scan2.png", "sweep.mp4"]
    assert heart.first.source == "scan1.png" and heart.last.where() == {
        "source": "sweep.mp4", "frame": 1, "time_s": 0.1}


def test_empty_study_and_streaming_input():
    res = evaluate_checklist(SMALL, iter(()), MODEL)
    assert res.observations == 0 and res.present == []
    assert res.missing == ["Brain", "Heart", "Femur"]
    nothing = evaluate_checklist(SMALL, [], ["Other view"])
    assert nothing.completeness is None and nothing.to_dict()["summary"]["complete"] is False


def test_report_escapes_names_and_carries_no_script(tmp_path):
    from fetalplanes.workflows.audit import (
        SourceFile,
        Study,
        StudyAudit,
        StudyScan,
        department_summary,
    )
    from fetalplanes.workflows.report import department_report, study_report

    evil = '<script>alert(1)</script>"onload=x.mp4'
    obs = _video(["Fetal brain"] * 3 + ["not_target"], [0.9, 0.95, 0.9, 0.8], source=evil,
                 not_target=[False, False, False, True])
    study = Study("s<1>", "one recording", [SourceFile(evil, "video", "x")])
    audit = StudyAudit(study, StudyScan(obs, MODEL), evaluate_checklist(SMALL, obs, MODEL))
    data = audit.to_dict({"name": "m<b>", "card": {"summary": "<img src=x onerror=y>"}})
    html = study_report(data, obs, {})
    dep = department_report(department_summary([audit], SMALL) | {"salt": "<u>salt</u>"})
    for page in (html, dep):
        assert "<script" not in page and "<img src=x" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;onload=x.mp4" in html
    assert "<svg" in html and "best frame of Brain at 0.10 s" in html
    assert 'id="missing"' in html and "Femur" in html.split('id="missing"')[1][:300]


def test_zero_shot_fold_of_a_views13_card():
    """The predictor's folding hook (zero_shot_fold) gives the 13 views + not_target."""
    from fetalplanes.data.preprocess import Preprocess
    from fetalplanes.inference.predictor import zero_shot_fold
    from fetalplanes.models.card import ModelCard

    card = ModelCard("sononet16", list(SONONET_LABELS), Preprocess(size=(224, 288)),
                     preset="views13")
    fold = zero_shot_fold(card)
    probs, names = fold(np.eye(14, dtype=np.float32))
    assert names == [*VIEWS13, NOT_TARGET]
    assert [names[i] for i in probs.argmax(1)] == [SONONET_TO_VIEW[x] for x in SONONET_LABELS]
