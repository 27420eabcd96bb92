"""Measure the bundled SonoNet-16 on the public real images this project can name, for its
model card (src/fetalplanes/models/pretrained/sononet16.card.json, "accuracy").

    python scripts/model_card_accuracy.py [SHARED]      # SHARED defaults to ../shared

Prints one JSON list: the 13 example frames published with the weights (file name = true
view) under the views13 preset, and the 24 HC18 head scans (every one a fetal head) under
views13 and seed4. Nothing is written; paste the list into the card when it changes.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import date
from pathlib import Path

from fetalplanes.inference.predictor import Predictor
from fetalplanes.models.sononet_classes import SONONET_TO_VIEW

EXAMPLE_VIEW = {  # file stem -> SonoNet label
    "3VV": "3VV", "4CH": "4CH", "ABDOMINAL": "Abdominal", "BRAIN-CB": "Brain (Cb.)",
    "BRAIN-TV": "Brain (Tv.)", "FEMUR": "Femur", "KIDNEYS": "Kidneys", "LIPS": "Lips",
    "LVOT": "LVOT", "PROFILE": "Profile", "RVOT": "RVOT", "SPINE-CORONAL": "Spine (cor.)",
    "SPINE-SAGITTAL": "Spine (sag.)",
}
HEAD_VIEWS = {"Trans-ventricular plane", "Trans-cerebellar plane"}


def main(shared: Path) -> list[dict[str, str]]:
    today = date.today().isoformat()
    views = Predictor.load("sononet16", preset="views13")
    seed4 = Predictor.load("sononet16", preset="seed4")
    examples = sorted((shared / "sononet" / "example_images").glob("*.png"))
    preds = views.predict([str(p) for p in examples], workers=0)
    wrong = [f"{Path(p.path).stem} read as {p.label} ({p.confidence:.2f})" for p in preds
             if p.label != SONONET_TO_VIEW[EXAMPLE_VIEW[Path(p.path).stem]]]
    right = len(preds) - len(wrong)
    heads = sorted((shared / "hc18-sample").glob("*.png"))
    head_views = Counter(p.label for p in views.predict([str(p) for p in heads], workers=0))
    brain = sum(p.label == "Fetal brain" for p in seed4.predict([str(p) for p in heads],
                                                                workers=0))
    n_head = sum(head_views[v] for v in HEAD_VIEWS)
    others = ", ".join(f"{k} {v}" for k, v in head_views.items() if k not in HEAD_VIEWS)
    return [
        {"what": "the 13 example frames published with the weights (one per view; screen "
                 "captures, automatic ultrasound crop)",
         "result": f"{right}/{len(preds)} views right" + (f"; {'; '.join(wrong)}" if wrong
                                                          else ""),
         "how": "fetalplanes predict sononet16 --preset views13 shared/sononet/example_images "
                "(scripts/model_card_accuracy.py)", "measured": today},
        {"what": "24 HC18 fetal head scans (head circumference planes, CC BY 4.0)",
         "result": f"{n_head}/{len(heads)} read as a head view (trans-ventricular "
                   f"{head_views['Trans-ventricular plane']}, trans-cerebellar "
                   f"{head_views['Trans-cerebellar plane']}; {others}); {brain}/{len(heads)} "
                   "fold to Fetal brain under seed4",
         "how": "fetalplanes predict sononet16 --preset views13 (and seed4) "
                "shared/hc18-sample (scripts/model_card_accuracy.py)", "measured": today},
    ]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared")
    print(json.dumps(main(root), indent=2))
