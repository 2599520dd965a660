"""The committed openapi.yaml is exactly what the application serves."""

from __future__ import annotations

from pathlib import Path

import yaml
from flask.testing import FlaskClient

from app.cli import render_openapi

SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"


def test_the_committed_openapi_document_matches_the_served_one(client: FlaskClient) -> None:
    served = client.get("/openapi.json").get_json()
    committed = yaml.safe_load(SPEC.read_text())
    assert committed == served, "openapi.yaml is stale: run `drawbridge openapi --output openapi.yaml`"
    assert SPEC.read_text() == render_openapi()


def test_every_error_response_is_documented_as_a_problem_document(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    responses = spec["components"]["responses"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if status == "default" or int(status) >= 400:
                    name = response["$ref"].rsplit("/", 1)[-1]
                    assert "application/problem+json" in responses[name]["content"], (path, method, status)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
