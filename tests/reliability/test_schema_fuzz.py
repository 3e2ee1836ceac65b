"""schemathesis against the app's own OpenAPI schema (FakeEngine): every documented route and parameter (the
REST paths, ids in URLs, limit/offset queries) with generated and hostile values, with and without a key. The
Tinker routes read raw bodies, which the schema does not describe; test_fuzz_api.py covers those from the SDK's
request shapes."""

from __future__ import annotations

import pytest
import schemathesis

from tests.api.conftest import KEY_A, LiveServer, make_config
from tests.reliability.conftest import assert_clean_answer, fuzz_settings
from tests.service.fakes import FakeEngine
from tinkerbell.api.app import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    engine = FakeEngine()
    # A live server (one lifespan for every case), not ASGI calls that would open and close the store each time.
    with LiveServer(create_app(make_config(tmp_path_factory.mktemp("schema") / "data"), engine)) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")
    engine.shutdown()


def test_documented_routes_never_fail_on_generated_input(api_schema):
    # schemathesis' own pytest plugin does not run under this pytest; its strategies do, one per operation.
    from hypothesis import given

    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert len(ops) > 20, "the OpenAPI schema lost its routes"
    for op in ops:
        @fuzz_settings(10, 300)
        @given(case=op.as_strategy())
        def prop(case):
            for headers in ({"X-API-Key": KEY_A}, {}):
                r = case.call(headers=headers, timeout=30)
                assert_clean_answer(r, f"{case.method} {case.formatted_path} {case.query}")

        prop()
