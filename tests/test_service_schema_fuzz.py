"""Schemathesis over the service's own OpenAPI document, against the in-process app.

Every operation is called with generated inputs (valid and not), with the token: no
answer is a 5xx, every status is one the document lists, every documented response
body matches its schema. Bounded: a few dozen examples per operation (well under 60 s).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from spikewatch.service.app import create_app  # noqa: E402
from spikewatch.service.config import ServiceConfig  # noqa: E402
from spikewatch.service.core import Service  # noqa: E402
from test_service_api import AUTH, TOKEN  # noqa: E402

#: What is checked. Not `positive_data_acceptance`: a schema-valid command can still be
#: refused for what it means (422: a rollback without its step; 409: nothing proposed).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _app() -> object:
    service = Service(ServiceConfig(db=":memory:", max_records=50), token=TOKEN)
    return create_app(service)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_operation_answers_a_5xx_or_an_undocumented_status(case: object) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)  # type: ignore[attr-defined]


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)  # fmt: skip
def test_without_a_token_every_answer_is_documented(case: object) -> None:
    """The limits in front of the routes answer 401 (and 429 past the failure rate)
    before any body is read: those answers are in the document too."""
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    case.call_and_validate(checks=checks)  # type: ignore[attr-defined]
