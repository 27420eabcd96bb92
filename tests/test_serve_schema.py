"""Property-based API test: schemathesis sends requests generated from /openapi.json.

It checks that no request makes the server fail (5xx) and that every answer matches the
documented status codes and response schemas. The app runs in process (ASGI) with an
untrained 64 px model, so no training is needed; examples are few to stay under a minute.
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fetalplanes.data.datasets import PLANES  # noqa: E402
from fetalplanes.data.transforms import Preprocess  # noqa: E402
from fetalplanes.inference.backends import TorchBackend  # noqa: E402
from fetalplanes.inference.predictor import Predictor  # noqa: E402
from fetalplanes.models import create_model  # noqa: E402
from fetalplanes.models.checkpoint import ModelCard  # noqa: E402
from fetalplanes.serving import ServeSettings, create_app  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def tiny_predictor() -> Predictor:
    """An untrained network is enough to exercise every code path of the API."""
    import torch

    classes = list(PLANES[:4])
    pp = Preprocess(size=(64, 64), crop=False, mean=0.449, std=0.226)
    card = ModelCard(
        "efficientnet_lite0",
        classes,
        pp,
        rejection={"method": "energy", "threshold": 0.0},
        metrics={"val": {"accuracy": float("nan")}},  # NaN must not break /api/v1/model
    )
    net = create_model("efficientnet_lite0", len(classes), pretrained=False)
    return Predictor(TorchBackend(net, pp, torch.device("cpu")), card, min_confidence=0.5)


@pytest.fixture(scope="module")
def api_schema() -> Any:
    app = create_app(tiny_predictor(), ServeSettings(max_file_bytes=50_000, max_files=8))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [
    ("GET", "/healthz", POSITIVE),
    ("GET", "/api/v1/model", POSITIVE),
    ("POST", "/api/v1/predict", POSITIVE),
    ("POST", "/api/v1/predict", NEGATIVE),  # the GETs take no input to get wrong
    ("POST", "/api/v1/scan", POSITIVE),
    ("POST", "/api/v1/scan", NEGATIVE),
    ("GET", "/api/v1/checklists", POSITIVE),
    ("GET", "/api/v1/model/card", POSITIVE),
    ("POST", "/api/v1/audit", POSITIVE),
    ("POST", "/api/v1/audit", NEGATIVE),
]


def test_schema_lists_the_api(api_schema: Any) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == {(method, path) for method, path, _ in CASES}


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_api_conforms_to_its_schema(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    """Hypothesis strategies from the schema, driven directly (independent of the plugin)."""

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    check()
