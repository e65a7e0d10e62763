"""Schemathesis over every operation of the OpenAPI document, in process (ASGI).

Generated requests, valid and invalid, against the app on a temporary SQLite database and
SQLite broker: no answer may be a server error, and every answer must match the schema
(status code, content type, headers, body). Bounded examples keep it under a minute.
The SSE stream is left out: its body never ends while a run is queued (nothing trains
here), and schemathesis reads a whole body before checking it; tests/test_api.py and
tests/test_api_security.py cover its answers.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.app import create_app
from store import db

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    allow_header_conformance,
]


@pytest.fixture()
def api_schema(batchlab_home, tmp_path) -> Any:
    app = create_app(
        database_url=f"sqlite:///{tmp_path / 'st.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )
    db.migrate(app.state.ctx.engine)  # what the lifespan does; the ASGI calls skip it
    app.state.ctx.migrated = True
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # The live stream answers for as long as its run is unfinished (see the docstring).
    return schema.exclude(path_regex=r"/stream$")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors_and_no_schema_violations(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)
