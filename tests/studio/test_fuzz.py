"""schemathesis fuzzes the studio's OpenAPI schema over HTTP: no generated request is a server
error, and every refusal is a 4xx with a JSON ``detail``. What it found is kept as named cases in
test_api.py (a NaN in a body made FastAPI's own 422 answer fail to serialise: a 500)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.studio.conftest import Studio

EXAMPLES = 40  # per operation


def test_no_request_is_a_server_error(studio: Studio):
    schema = schemathesis.openapi.from_url(f"{studio.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen: dict[str, set[int]] = {}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(headers={**(case.headers or {}), "X-Annotator": "fuzz"})
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.path_parameters, case.body,
                                                response.status_code, response.text)
            if response.status_code >= 400:
                assert "detail" in response.json(), response.text  # JSON with the reason

        check()
    assert set(seen) == {o.label for o in operations}
