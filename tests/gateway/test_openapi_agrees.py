"""Regressions from the first fuzzing pass: the OpenAPI document says what the server does
(``/metrics`` is text, the chat roles and non-empty prompts it accepts), and a 405 names the
allowed methods in ``Allow``."""

from __future__ import annotations

import httpx

from tests.gateway.test_validation import assert_still_serving


def test_metrics_are_documented_as_text(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    documented = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(documented) == ["text/plain"]
    served = client.get("/metrics")
    assert served.headers["content-type"].startswith("text/plain")


def test_the_schemas_refuse_what_the_server_refuses(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    role = schemas["ChatMessage"]["properties"]["role"]
    assert sorted(role["enum"]) == ["assistant", "developer", "system", "tool", "user"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    forms = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    text, ids, texts, id_lists = forms
    assert text == {"type": "string", "minLength": 1}
    assert ids["minItems"] == 1 and ids["items"] == {"type": "integer", "minimum": 0}
    assert texts["minItems"] == 1 and texts["items"]["minLength"] == 1
    assert id_lists["minItems"] == 1 and id_lists["items"]["minItems"] == 1


def test_405_names_the_allowed_methods(client: httpx.Client) -> None:
    for method, path, allowed in (("GET", "/v1/completions", "POST"), ("DELETE", "/health", "GET"),
                                  ("PUT", "/v1/models", "GET")):
        response = client.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert_still_serving(client)
