"""The OpenAPI document's request examples work: every POST with a JSON body has one, and, sent in the
document's order to a fresh install (api + worker, the shared data), each is accepted and its job succeeds."""

from typing import Any

import pytest

from tests.live import Service, wait_for

pytestmark = pytest.mark.e2e

# run in this order: registering the dataset first, then the pretraining job that makes st_mem-tiny@1
ORDER = ["/datasets", "/jobs/pretrain", "/jobs/finetune", "/jobs/evaluate", "/jobs/embed"]
NOT_RUN = {"/models/import": "needs a published checkpoint, which ../shared/data does not hold"}


def body_example(document: dict[str, Any], operation: dict[str, Any]) -> dict[str, Any] | None:
    """The operation's JSON body example: the schema's own, else its properties' examples (None: none)."""
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if schema.get("examples"):
        return schema["examples"][0]
    properties = schema["properties"]
    if not all(properties[name].get("examples") for name in schema.get("required", [])):
        return None
    return {name: p["examples"][0] for name, p in properties.items() if p.get("examples")}


def test_every_json_post_has_an_example_that_succeeds_on_a_fresh_install(production_service: Service) -> None:
    with production_service.client() as client:
        document = client.get("/openapi.json").json()
        posts = {
            path: item["post"]
            for path, item in document["paths"].items()
            if "post" in item and "application/json" in item["post"].get("requestBody", {}).get("content", {})
        }
        examples = {path: body_example(document, operation) for path, operation in posts.items()}
        assert all(examples.values()), {path for path, example in examples.items() if example is None}
        assert set(posts) == set(ORDER) | set(NOT_RUN), set(posts)
        for path in ORDER:
            answer = client.post(path, json=examples[path])
            assert answer.status_code in (201, 202), f"{path} {examples[path]}: {answer.text}"
            if path.startswith("/jobs/"):
                job_id = answer.json()["job_id"]
                done = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 600)
                assert done["status"] == "succeeded", f"{path} {examples[path]}: {done['error']}"
