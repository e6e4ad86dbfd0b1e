"""GET /methods (the model families, their sizes and recipes) and the 422s of bad family / size / fold /
ensemble choices in job requests, through the HTTP API in-process (nothing is queued)."""

import pytest
from fastapi.testclient import TestClient

from api.schemas import METHODS_EXAMPLE
from services.jobs.params import PretrainParams
from services.models.families import FAMILIES


@pytest.fixture(scope="module")
def listed(client: TestClient) -> dict:
    response = client.get("/methods")
    assert response.status_code == 200, response.text
    return {f["name"]: f for f in response.json()["families"]}


def size_of(listed: dict, family: str, size: str) -> dict:
    return next(s for s in listed[family]["sizes"] if s["name"] == size)


def test_methods_lists_every_family_with_its_sizes(listed: dict) -> None:
    assert list(listed) == ["st_mem", "ecg_jepa", "resnet1d"]
    assert [s["name"] for s in listed["st_mem"]["sizes"]] == ["tiny", "small", "base"]
    assert [s["name"] for s in listed["ecg_jepa"]["sizes"]] == ["tiny", "base"]
    assert [s["name"] for s in listed["resnet1d"]["sizes"]] == ["tiny", "base"]
    assert {f: listed[f]["method"] for f in listed} == {
        "st_mem": "st_mem",
        "ecg_jepa": "ecg_jepa",
        "resnet1d": "simclr",
    }
    for name, family in listed.items():
        assert family["description"] == FAMILIES[name].description
        for size in family["sizes"]:
            assert size["embedding_dim"] == FAMILIES[name].sizes[size["name"]].width
            assert size["pretrain_recipe"]["evidence"] and size["finetune_recipe"]["evidence"]


def test_input_specs(listed: dict) -> None:
    resnet = size_of(listed, "resnet1d", "base")["input"]
    assert (len(resnet["leads"]), resnet["fs"], resnet["samples"]) == (12, 100.0, 250)
    jepa = size_of(listed, "ecg_jepa", "tiny")["input"]
    assert (jepa["leads"], jepa["fs"], jepa["samples"]) == (
        ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"],
        250.0,
        2500,
    )
    assert size_of(listed, "st_mem", "tiny")["input"]["samples"] == 2250


def test_pretrain_recipe_is_what_a_pretraining_job_fills_in(listed: dict) -> None:
    shown = size_of(listed, "st_mem", "tiny")["pretrain_recipe"]
    filled = PretrainParams(dataset="ptbxl-500", method="st_mem", model_size="tiny")
    for field in ("epochs", "batch_size", "learning_rate", "weight_decay", "warmup_epochs"):
        assert shown[field] == pytest.approx(getattr(filled, field)), field
    assert "out-of-fold probes" in shown["evidence"]  # where the tiny recipe was shown to learn


def test_finetune_recipe_is_what_a_finetuning_job_runs_with(listed: dict) -> None:
    from services.jobs.params import FinetuneParams

    shown = size_of(listed, "resnet1d", "base")["finetune_recipe"]
    from_pretrained = FinetuneParams(dataset="ptbxl-500", method="finetune", model="simclr-base@1")
    resolved = from_pretrained.recipe("resnet1d", "base")
    assert {k: shown[k] for k in resolved} == pytest.approx(resolved)
    scratch = FinetuneParams(dataset="ptbxl-500", method="finetune", family="resnet1d")
    differs = {k for k, v in scratch.recipe("resnet1d", scratch.model_size).items() if v != resolved[k]}
    assert differs == {"probe_first", "ema_decay", "learning_rate"} and shown["probe_first"] is True  # LP-FT
    assert (shown["ema_decay"], shown["scratch_ema_decay"]) == (0.0, 0.97)  # the average: from scratch only
    # both sizes: a pretrained encoder fine-tunes at a tenth of the from-scratch lr; both shown, per batch
    given = {"dataset": "ptbxl-500", "method": "finetune", "batch_size": 32}
    for size in ("base", "tiny"):
        shown = size_of(listed, "resnet1d", size)["finetune_recipe"]
        model = "simclr@1" if size == "tiny" else "simclr-base@1"
        pretrained = FinetuneParams(**given, model=model).recipe("resnet1d", size)
        scratch = FinetuneParams(**given, family="resnet1d", model_size=size).recipe("resnet1d", size)
        lrs = (shown["learning_rate"], shown["scratch_learning_rate"], shown["batch_size"])
        assert lrs == (1e-3, 1e-2, 64)
        assert (pretrained["learning_rate"], scratch["learning_rate"]) == pytest.approx((5e-4, 5e-3))


@pytest.mark.parametrize(("family", "size"), [("st_mem", "tiny"), ("ecg_jepa", "tiny"), ("resnet1d", "base")])
def test_parameter_counts_are_those_of_a_real_encoder(listed: dict, family: str, size: str) -> None:
    f = FAMILIES[family]
    encoder = f.encoder_class(f.sizes[size])
    assert size_of(listed, family, size)["encoder_parameters"] == sum(p.numel() for p in encoder.parameters())


def test_documented_example_is_what_the_service_lists(client: TestClient, listed: dict) -> None:
    (example,) = METHODS_EXAMPLE["families"]
    (example_size,) = example["sizes"]
    assert {k: v for k, v in listed[example["name"]].items() if k != "sizes"} == {
        k: v for k, v in example.items() if k != "sizes"
    }
    assert size_of(listed, example["name"], example_size["name"]) == example_size
    operation = client.get("/openapi.json").json()["paths"]["/methods"]["get"]
    assert operation["summary"].startswith("Model families")
    assert operation["responses"]["200"]["content"]["application/json"]["example"] == METHODS_EXAMPLE


def test_methods_need_no_api_key(client: TestClient, settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("ECGSSL_API_KEY", "s3cret")
    assert client.post("/jobs/pretrain", json={"dataset": "ptbxl-500"}).status_code == 401
    assert client.get("/methods").status_code == 200  # read-only, open like GET /jobs


# --------------------------------------------------------------------------------------------------
# bad family / size / fold / ensemble choices: one 422 each, on the field, saying what was expected

FINETUNE = {"dataset": "ptbxl-500", "method": "finetune"}
BAD_CHOICES = [  # (id, url, body, the field the error is on (None: the body), what its message must say)
    ("neither-model-nor-family", "/jobs/finetune", FINETUNE, None, ["'model'", "'family'", "neither"]),
    (
        "both-model-and-family",
        "/jobs/finetune",
        {**FINETUNE, "model": "st_mem-tiny@1", "family": "st_mem"},
        "family",
        ["either 'model' or 'family', not both"],
    ),
    (
        "unknown-family",
        "/jobs/finetune",
        {**FINETUNE, "family": "transformer"},
        "family",
        ["'st_mem', 'ecg_jepa' or 'resnet1d'"],
    ),
    (
        "size-the-family-lacks",
        "/jobs/finetune",
        {**FINETUNE, "family": "resnet1d", "model_size": "small"},
        "model_size",
        ["model_size 'small' does not exist for resnet1d: one of tiny, base", "GET /methods"],
    ),
    (
        "test-fold-0",
        "/jobs/finetune",
        {**FINETUNE, "family": "resnet1d", "test_fold": 0},
        "test_fold",
        ["greater than or equal to 1"],
    ),
    (
        "test-fold-11",
        "/jobs/finetune",
        {**FINETUNE, "family": "resnet1d", "test_fold": 11},
        "test_fold",
        ["less than or equal to 10"],
    ),
    (
        "ensemble-of-linear-probes",
        "/jobs/finetune",
        {**FINETUNE, "method": "linear_probe", "family": "resnet1d", "ensemble": 2},
        "ensemble",
        ["method 'finetune' only", "'linear_probe'"],
    ),
    (
        "ensemble-11",
        "/jobs/finetune",
        {**FINETUNE, "family": "resnet1d", "ensemble": 11},
        "ensemble",
        ["less than or equal to 10"],
    ),
    (
        "probe-first-not-a-boolean",
        "/jobs/finetune",
        {**FINETUNE, "family": "resnet1d", "probe_first": "maybe"},
        "probe_first",
        ["valid boolean"],
    ),
    (
        "pretrain-size-the-method-lacks",
        "/jobs/pretrain",
        {"dataset": "ptbxl-500", "method": "simclr", "model_size": "small"},
        "model_size",
        ["model_size 'small' does not exist for simclr", "one of tiny, base", "GET /methods"],
    ),
    (
        "model-size-with-a-model",
        "/jobs/finetune",
        {**FINETUNE, "model": "st_mem-tiny@1", "model_size": "tiny"},
        "model_size",
        ["'model_size' goes with 'family' only", "st_mem-tiny@1"],
    ),
]


@pytest.mark.parametrize(
    ("url", "body", "field", "says"), [c[1:] for c in BAD_CHOICES], ids=[c[0] for c in BAD_CHOICES]
)
def test_bad_choices_are_422_on_the_field(
    client: TestClient, url: str, body: dict, field: str | None, says: list[str]
) -> None:
    response = client.post(url, json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]  # one error, not a cascade of follow-ups
    assert error["loc"] == (["body", field] if field else ["body"])
    for part in says:
        assert part in error["msg"], (part, error["msg"])


def test_every_declared_parameter_count_is_that_of_the_real_encoder() -> None:
    """The catalogue declares the counts (the gateway lists them without torch); each is checked here on
    the family's encoder built on the meta device (shapes only)."""
    import torch

    for f in FAMILIES.values():
        for size, cfg in f.sizes.items():
            with torch.device("meta"):
                encoder = f.encoder_class(cfg)
            assert f.encoder_parameters[size] == sum(p.numel() for p in encoder.parameters()), (f.name, size)


def test_the_catalogue_is_the_families_torch_free_part() -> None:
    from services.models.catalog import SPECS

    assert list(SPECS) == list(FAMILIES)
    for name, f in FAMILIES.items():
        assert f.spec == SPECS[name]
        assert set(f.encoder_parameters) == set(f.sizes) == set(f.pretrain_recipes), name
