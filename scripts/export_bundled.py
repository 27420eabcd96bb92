"""Rebuild the ONNX copies (fp32 and int8) of the bundled SonoNet-16
(src/fetalplanes/models/pretrained/). int8 activation ranges come from seeded synthetic
phantoms, never from the real frames the tests measure it on.

Run after changing the SonoNet model code or its preprocessing; `tests/test_zero_shot.py`
checks that the shipped file and the torch model agree to < 1e-4.
Usage: .venv/bin/python scripts/export_bundled.py
"""

from pathlib import Path

from fetalplanes.models import get_spec
from fetalplanes.tools.export import export_pretrained, quantize_pretrained

if __name__ == "__main__":
    spec = get_spec("sononet16")
    weights = spec.bundled_weights()
    assert weights is not None, "the SonoNet-16 weights are not bundled"
    out = export_pretrained("sononet16", Path(weights).with_name("sononet16.onnx"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    q = quantize_pretrained("sononet16", out, out.with_name("sononet16.int8.onnx"))
    print(f"wrote {q} ({q.stat().st_size / 1e6:.1f} MB)")
