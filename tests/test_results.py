"""One result schema: unique columns, the same in predict's CSV, the sort journal, the
server and evaluate; formulas neutralised; JSON and CSV views agree."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from typer.testing import CliRunner

from fetalplanes.cli import app
from fetalplanes.inference.results import Prediction, columns, failed
from fetalplanes.workflows.sorting import journal_columns

FOLDED = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "not_target"]


def test_columns_are_unique_even_with_a_not_target_class() -> None:
    cols = columns(FOLDED)
    assert len(cols) == len(set(cols))
    assert "not_target" in cols and "p_not_target" in cols
    assert journal_columns(FOLDED) == [*cols, "destination"]


def test_csv_row_reads_back_with_dictreader() -> None:
    p = Prediction("=cmd|calc.png", label="Fetal brain", confidence=0.9,
                   probs=dict.fromkeys(FOLDED, 0.2),
                   not_target=False, rejection_score=0.71, model_label="Brain (Tv.)",
                   model_confidence=0.8)
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns(FOLDED))
    w.writeheader()
    w.writerow(p.to_row(FOLDED))
    w.writerow(failed("@bad.png", "@bad.png: not an image").to_row(FOLDED))
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rows[0]["not_target"] == "0" and rows[0]["p_not_target"] == "0.200000"
    assert rows[0]["path"] == "'=cmd|calc.png" and rows[0]["model_label"] == "Brain (Tv.)"
    assert rows[0]["rejection_score"] == "0.710000"
    assert rows[1]["error"].startswith("'@") and rows[1]["label"] == ""
    d = p.to_dict()
    assert d["probabilities"]["not_target"] == 0.2 and d["rejection_score"] == 0.71


def test_predict_csv_and_sort_journal_share_the_schema(
    trained_run: Path, seed_data: Path, tmp_path: Path
) -> None:
    images = sorted((seed_data / "images").glob("*.png"))[:6]
    res = CliRunner().invoke(app, ["predict", str(trained_run), *map(str, images),
                                   "--format", "csv", "-q"])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split(",")
    assert len(header) == len(set(header))
    folder = tmp_path / "in"
    folder.mkdir()
    for f in images:
        (folder / f.name).write_bytes(f.read_bytes())
    res = CliRunner().invoke(app, ["sort", str(trained_run), str(folder), str(tmp_path / "o"),
                                   "-q"])
    assert res.exit_code == 0, res.output
    journal = (tmp_path / "o" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert journal == [*header, "destination"]
    js = CliRunner().invoke(app, ["predict", str(trained_run), str(images[0]), "--format",
                                  "json", "-q"])
    assert set(json.loads(js.stdout)[0]) >= {"path", "label", "confidence", "rejection_score"}


def test_every_view_of_a_result_derives_from_the_one_declaration() -> None:
    """Result fields are declared once (`Prediction`); JSON, CSV, the server's FileResult
    and the scan API's TimelineFrame carry exactly those fields (plus their own extras)."""
    import dataclasses

    from fetalplanes.inference.results import HEAD_COLUMNS, result_fields
    from fetalplanes.serving.scan import TimelineFrame
    from fetalplanes.serving.schemas import FileResult

    declared = [f.name for f in dataclasses.fields(Prediction) if f.name != "outputs"]
    fields = result_fields()
    assert [f.name for f in fields] == declared
    keys = {f.key for f in fields}
    assert set(FileResult.model_fields) == keys | {"filename", "heatmap", "heatmap_error"}
    assert set(TimelineFrame.model_fields) == (keys - {"path", "error"}) | {"smoothed"}
    assert list(HEAD_COLUMNS) == [f.name for f in fields if f.csv and f.name != "error"]
    for f in fields:  # every field documents itself, and the API shows that text
        assert f.doc and FileResult.model_fields[f.key].description == f.doc
    full = Prediction("a.dcm#frame=2", frame=2, time_s=0.1, label="Fetal brain",
                      confidence=0.9, probs=dict.fromkeys(FOLDED, 0.2), rejection_score=0.5,
                      model_label="Brain (Tv.)", model_confidence=0.8,
                      pixel_spacing_mm=(0.1, 0.1), notes=["a note"])
    assert set(full.to_dict()) == keys - {"error"}  # optional fields only when set
    assert FileResult(filename="a.dcm", **full.to_dict()).path == "a.dcm#frame=2"
