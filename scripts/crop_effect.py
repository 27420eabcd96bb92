"""Show the ultrasound crop's effect on zero-shot SonoNet-16 (docs/models.md table).

Usage: python scripts/crop_effect.py [SHARED_DIR]   (default ../shared)
"""

from __future__ import annotations

import sys
from pathlib import Path

from fetalplanes.data.images import list_images
from fetalplanes.inference.predictor import Predictor

NAMES = {"3VV": "3VV", "4CH": "4CH", "ABDOMINAL": "Abdominal", "BRAIN-CB": "Brain (Cb.)",
         "BRAIN-TV": "Brain (Tv.)", "FEMUR": "Femur", "KIDNEYS": "Kidneys", "LIPS": "Lips",
         "LVOT": "LVOT", "PROFILE": "Profile", "RVOT": "RVOT", "SPINE-CORONAL": "Spine (cor.)",
         "SPINE-SAGITTAL": "Spine (sag.)"}


def main(shared: Path) -> None:
    weights = shared / "sononet" / "SonoNet16.pth"
    frames = list_images([shared / "sononet" / "example_images"])
    heads = list_images([shared / "hc18-sample"])
    runs = {c: Predictor.from_pretrained("sononet16", weights, crop=c) for c in (False, True)}
    res = {c: {"frames": p.predict(frames), "heads": p.predict(heads)} for c, p in runs.items()}
    print("| frame | true | no crop | crop |")
    print("| --- | --- | --- | --- |")
    correct = {False: 0, True: 0}
    for i, f in enumerate(frames):
        true = NAMES.get(f.stem, f.stem)
        cells = []
        for c in (False, True):
            r = res[c]["frames"][i]
            got = r.extra["model_label"]
            correct[c] += got == true
            cells.append(f"{got} ({r.extra['model_confidence']:.2f})")
        print(f"| {f.name} | {true} | {cells[0]} | {cells[1]} |")
    print(f"| **correct** | | {correct[False]}/13 | {correct[True]}/13 |")
    for c in (False, True):
        brain = sum(r.label == "Fetal brain" for r in res[c]["heads"])
        print(f"hc18-sample folded to Fetal brain, crop={c}: {brain}/{len(heads)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent
         / "shared")
