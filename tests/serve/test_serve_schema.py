"""Property test of the published OpenAPI schema: no client input may produce a 5xx, and every answer has the
shape the schema documents for its status (request and response models alike)."""

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from support.serve import serve_tiny

EXAMPLES_PER_OPERATION = 60  # per operation and mode; bounded so the test stays around a minute on 2 cores


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    # a short context bounds the work of each generated request
    with serve_tiny(tiny_model_dir, api_key=None, max_model_len=96, max_num_seqs=4) as server:
        yield server


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(live, mode):
    operations = _operations(live.url)
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/ready"}
    statuses = Counter()
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case):
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = "student"  # a random name only ever reaches the 404 branch
            response = case.call(base_url=live.url, timeout=60)
            statuses[(operation.path, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            if response.status_code >= 400 and response.status_code != 503:
                assert response.status_code != 422  # validation errors are mapped to 400
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

        check()
    print(sorted(statuses.items()))
    if mode is GenerationMode.POSITIVE:  # the generator reaches the model, not only the validators
        assert statuses[("/v1/completions", 200)] > 0 and statuses[("/v1/chat/completions", 200)] > 0
