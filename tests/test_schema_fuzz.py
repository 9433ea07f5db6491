"""The OpenAPI document: public, complete, and true to the API's responses.

Schemathesis reads /schema from the ASGI application, generates requests for
every operation (the schema's examples, boundary values, then random and
invalid inputs) and sends them in process. Each response must not be a 5xx
and must match the documented status codes, content types, headers and body
schemas. The fake Gemini server serves every model call.

The run goes through schemathesis's engine, the one its command line uses,
because its pytest plugin (4.32.5) fails under pytest 9.2: it reads the
removed ``Item._nodeid`` attribute.
"""

import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import schemathesis
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import Client
from schemathesis.engine import Status, events, from_schema

from gateway_project.asgi import application
from llm.keys import api_key_create
from tests.fake_gemini import Reply

# Generated cases per operation in the fuzzing phase, bounded so the module
# stays well under two minutes on two cores.
MAX_EXAMPLES = 50
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]

OPERATIONS = {
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /prompts",
    "GET /prompts/{name}",
    "POST /prompts/{name}/render",
    "POST /chat",
    "POST /chat/stream",
    "POST /prompts/{name}/chat",
    "POST /prompts/{name}/chat/stream",
}
PROBES = {"GET /health", "GET /ready"}
BEARER = [{"bearerAuth": []}]


@dataclass
class FuzzReport:
    operations: set[str] = field(default_factory=set)
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.operations)} operations, {self.cases} cases, "
            f"{len(self.failures)} failures, {len(self.errors)} errors"
        ]
        by_operation = defaultdict(list)
        for (label, status), count in sorted(self.statuses.items()):
            by_operation[label].append(f"{status} x{count}")
        for label, counts in by_operation.items():
            lines.append(f"  {label}: {', '.join(counts)}")
        return "\n".join(lines)


def fuzz(schema) -> FuzzReport:
    """Run the engine over every operation and collect what it found."""
    report = FuzzReport()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            report.operations.add(event.recorder.label)
            report.cases += len(event.recorder.cases)
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    status = interaction.response.status_code
                    report.statuses[event.recorder.label, status] += 1
            report.failures.extend(_failures(event.recorder))
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            report.failures.extend(str(failure) for failure in event.failures)
    return report


def _failures(recorder) -> list[str]:
    found = []
    for checks in recorder.checks.values():
        for check in checks:
            if check.status == Status.FAILURE and check.failure_info is not None:
                failure = check.failure_info.failure
                found.append(
                    f"{recorder.label}: {check.name}: {failure.title}\n"
                    f"{failure.message}\n{check.failure_info.code_sample}"
                )
    return found


@pytest.fixture
def api_schema(fake_gemini):
    fake_gemini.default_reply = Reply(chunks=["Fuzzed", " answer"])
    call_command("sync_prompts", stdout=io.StringIO())
    # Limits far above the run's needs, so that every response carries the
    # X-RateLimit-* headers and their schema is checked too.
    _, raw_key = api_key_create(
        name="schema fuzzing",
        requests_per_minute=1_000_000,
        tokens_per_day=1_000_000_000,
    )

    schema = schemathesis.openapi.from_asgi("/schema", application)
    schema.config.update(headers={"Authorization": f"Bearer {raw_key}"})
    schema.config.generation.update(
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        database="none",
        modes=["positive", "negative"],
    )
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.checks.update(included_check_names=CHECKS)
    return schema


def schema_operations(document: dict) -> dict[str, dict]:
    return {
        f"{method.upper()} {path}": operation
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }


def test_schema_is_public_and_lists_every_endpoint():
    response = Client().get("/schema?format=json")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/vnd.oai.openapi+json"
    assert set(schema_operations(response.json())) == OPERATIONS


def test_schema_requires_bearer_key_except_on_probes():
    document = Client().get("/schema?format=json").json()

    for label, operation in schema_operations(document).items():
        expected = None if label in PROBES else BEARER
        assert operation.get("security") == expected, label
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A gateway API key, created in the admin or with "
        "`manage.py create_api_key`: `Authorization: Bearer gw_...`.",
    }


def test_schema_shows_public_metrics(settings):
    settings.METRICS_PUBLIC = True

    document = Client().get("/schema?format=json").json()

    assert "security" not in schema_operations(document)["GET /metrics"]
    assert schema_operations(document)["GET /prompts"]["security"] == BEARER


def test_schema_documents_error_shape():
    document = Client().get("/schema?format=json").json()
    chat = schema_operations(document)["POST /prompts/{name}/chat"]

    assert sorted(chat["responses"]) == [
        "200", "400", "401", "403", "404", "413", "415",
        "422", "429", "500", "502", "503", "504",
    ]  # fmt: skip
    error = chat["responses"]["429"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    assert set(chat["responses"]["429"]["headers"]) == {
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "X-Request-ID",
    }
    assert document["components"]["schemas"]["ErrorDetail"]["required"] == [
        "code",
        "message",
    ]


def test_stream_endpoints_document_event_stream():
    operations = schema_operations(Client().get("/schema?format=json").json())

    for label in ("POST /chat/stream", "POST /prompts/{name}/chat/stream"):
        content = operations[label]["responses"]["200"]["content"]
        assert list(content) == ["text/event-stream"], label


def test_docs_serve_swagger_ui_without_cdn():
    response = Client().get("/docs")

    assert response.status_code == 200
    page = response.content.decode()
    bundle = "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"
    assert f'src="/static/{bundle}"' in page
    assert "cdn.jsdelivr.net" not in page
    assert finders.find(bundle) is not None


@pytest.mark.django_db(transaction=True)
def test_api_conforms_to_schema(api_schema):
    report = fuzz(api_schema)

    print(report.summary())
    assert report.operations == OPERATIONS
    assert report.errors == []
    assert report.failures == [], "\n\n".join(report.failures)
