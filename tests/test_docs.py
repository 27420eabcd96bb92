"""Every ```python block in README.md and docs/*.md runs, so the docs cannot drift.

Blocks of one file run in order in one namespace, in a fresh folder holding what the
examples name: `fetalplanes-demo/run` (a trained run, where the README's `fetalplanes demo`
leaves its run), `scan.png` and `scans/` (synthetic phantoms).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WITH_CODE = [p for p in DOCS if BLOCK.search(p.read_text())]


def test_docs_have_python_examples() -> None:
    assert any(p.name == "api.md" for p in WITH_CODE)


@pytest.mark.slow
@pytest.mark.parametrize("doc", WITH_CODE, ids=[p.name for p in WITH_CODE])
def test_python_blocks_run(doc: Path, trained_run: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from fetalplanes.data.images import opencv
    from fetalplanes.data.synth import SEED4, render_phantom

    shutil.copytree(trained_run, tmp_path / "fetalplanes-demo" / "run")
    (tmp_path / "scans").mkdir()
    cv2 = opencv()
    for i, plane in enumerate(SEED4):
        img = render_phantom(plane, np.random.default_rng(100 + i), size=(180, 266))
        cv2.imwrite(str(tmp_path / "scans" / f"scan{i}.png"), img)
    shutil.copy(tmp_path / "scans" / "scan1.png", tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for i, code in enumerate(BLOCK.findall(doc.read_text())):
        try:
            exec(compile(code, f"{doc.name} block {i + 1}", "exec"), namespace)
        except Exception as exc:  # the failing block, in a readable message
            pytest.fail(f"{doc.name} python block {i + 1} failed: {type(exc).__name__}: {exc}")
    assert os.getcwd() == str(tmp_path)
