"""Which weights a fine-tune validates, keeps and serves, besides the trained ones: their moving average
(``ema_decay``) or WiSE-FT's interpolation from LP-FT's start (``wise_ft``)."""

import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from services.db.models import ModelVersion
from services.db.session import session_scope
from services.jobs.downstream import WeightAverage, WeightInterpolation
from services.jobs.store import job_dir
from services.models.checkpoints import load_saved_encoder
from tests.test_downstream import finished, post_job


def test_the_average_moves_by_one_minus_decay_each_step_and_is_only_lent_to_the_model() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    average = WeightAverage(model, decay=0.75)
    for value in (4.0, 8.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked += 3
        average.update()
    # 0 -> 0.75 * 0 + 0.25 * 4 = 1 -> 0.75 * 1 + 0.25 * 8 = 2.75; the integer counter is copied
    assert torch.allclose(average.average["0.weight"], torch.full((1, 2), 2.75))
    assert int(average.average["1.num_batches_tracked"]) == 6
    model.to(torch.float64)  # the model moves after the average was made (the loop puts it on its device)
    average.update()  # 0.75 * 2.75 + 0.25 * 8 = 4.0625, kept where the model now is
    assert average.average["0.weight"].dtype == torch.float64
    assert torch.allclose(average.average["0.weight"], torch.full((1, 2), 4.0625, dtype=torch.float64))
    with average.swapped_in():
        assert torch.allclose(model[0].weight, torch.full((1, 2), 4.0625, dtype=torch.float64))
    assert torch.allclose(
        model[0].weight, torch.full((1, 2), 8.0, dtype=torch.float64)
    )  # the trained weights again


def test_a_finetune_with_ema_decay_keeps_and_serves_the_average(client: TestClient) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "record_limit": 100, "epochs": 3, "ema_decay": 0.9, "seed": 2}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    result = job["result"]
    assert result["recipe"]["ema_decay"] == 0.9
    assert result["kept"].endswith("the weights' moving average (decay 0.9)"), result["kept"]
    with session_scope() as s:
        version = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one()
        folder = Path(version.onnx_path).parent
    served = torch.load(folder / "downstream.pt", weights_only=True)["state_dict"]
    work = job_dir(uuid.UUID(job["id"]))
    kept = torch.load(work / "best.pt", weights_only=True)["state_dict"]  # the best epoch's average
    trained = torch.load(work / "checkpoint.pt", weights_only=False)["model"]  # the loop's last weights
    assert set(served) == set(kept) and all(torch.equal(served[n], v) for n, v in kept.items())
    weight = "encoder.stem.0.0.weight"  # the first convolution
    assert not torch.equal(served[weight], trained[f"model.{weight}"].cpu())


def test_the_moving_average_is_the_default_only_where_it_was_shown_to_help(client: TestClient) -> None:
    """On by default for the 1-D ResNet trained from scratch (the ``-ema`` benchmark lines), off for every
    encoder fine-tuned from pretraining and for the transformers; GET /methods shows what jobs run with."""
    from services.jobs.params import FinetuneParams
    from services.models.families import SPECS

    families = client.get("/methods").json()["families"]
    shown = {(f["name"], s["name"]): s["finetune_recipe"] for f in families for s in f["sizes"]
             if s["finetune_recipe"]}  # fmt: skip
    resolved = {}
    for family, size in shown:
        common = {"dataset": "ptbxl-500", "method": "finetune"}
        scratch = FinetuneParams(**common, family=family, model_size=size).recipe(family, size)
        pretrained = FinetuneParams(**common, model=f"{SPECS[family].method}@1").recipe(family, size)
        resolved[family, size] = (scratch["ema_decay"], pretrained["ema_decay"])
        listed = shown[family, size]
        assert listed["ema_decay"] == pretrained["ema_decay"]
        from_scratch = (
            listed["ema_decay"] if listed["scratch_ema_decay"] is None else listed["scratch_ema_decay"]
        )
        assert from_scratch == scratch["ema_decay"]
    assert (resolved.pop(("resnet1d", "tiny")), resolved.pop(("resnet1d", "base"))) == ((0.97, 0.0),) * 2
    assert resolved and set(resolved.values()) == {(0.0, 0.0)}
    off = FinetuneParams(
        dataset="ptbxl-500", method="finetune", family="resnet1d", model_size="tiny", ema_decay=0
    )
    assert off.recipe("resnet1d", "tiny")["ema_decay"] == 0.0  # a job can still turn it off


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"method": "finetune", "ema_decay": 1.0}, "ema_decay"),
        ({"method": "finetune", "ema_decay": -0.1}, "ema_decay"),
        ({"method": "linear_probe", "ema_decay": 0.9}, "'ema_decay' goes with method 'finetune' only"),
    ],
)
def test_a_bad_ema_decay_is_a_422_naming_it(client: TestClient, body: dict, expected: str) -> None:
    response = client.post("/jobs/finetune", json={"family": "resnet1d", "dataset": "ptbxl-500", **body})
    assert response.status_code == 422, response.text
    assert expected in response.text


def test_the_interpolation_lerps_from_the_start_and_is_only_lent_to_the_model() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    wise = WeightInterpolation(model, alpha=0.25)  # the start: 2
    with torch.no_grad():
        model[0].weight.fill_(6.0)
    model[1].num_batches_tracked += 5
    wise.update()  # (nothing per step)
    assert torch.allclose(wise.average["0.weight"], torch.full((1, 2), 0.75 * 2.0 + 0.25 * 6.0))
    assert int(wise.average["1.num_batches_tracked"]) == 5  # integer buffers: the trained ones
    with wise.swapped_in():
        assert torch.allclose(model[0].weight, torch.full((1, 2), 3.0))
    assert torch.allclose(model[0].weight, torch.full((1, 2), 6.0))  # the trained weights again


def test_a_finetune_with_wise_ft_serves_the_interpolation_from_the_pretrained_one(client: TestClient) -> None:
    """One epoch, so the kept epoch is the loop's last: the served encoder is exactly halfway between the
    pretrained one (with the probe's head: LP-FT ran first) and the trained one."""
    pretrain = {"dataset": "ptbxl-500", "method": "simclr", "model_size": "tiny", "epochs": 1,
                "batch_size": 16, "record_limit": 40, "model_name": f"w-{uuid.uuid4().hex[:6]}"}  # fmt: skip
    base = finished(client, post_job(client, "pretrain", pretrain))["model_version"]
    body = {"model": base, "dataset": "ptbxl-500", "method": "finetune", "record_limit": 100, "epochs": 1,
            "wise_ft": 0.5, "learning_rate": 1e-2, "warmup_epochs": 0, "seed": 2}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    result = job["result"]
    assert (result["recipe"]["wise_ft"], result["recipe"]["probe_first"]) == (0.5, True)
    assert "probe_val_macro_auroc" in result
    assert result["kept"].endswith("WiSE-FT: 0.5 x LP-FT's start + 0.5 x the fine-tuned weights"), result
    with session_scope() as s:
        folder = {v.ref: Path(v.onnx_path).parent for v in s.query(ModelVersion)}
        served_ref = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one().ref
    served = torch.load(folder[served_ref] / "downstream.pt", weights_only=True)["state_dict"]
    trained = torch.load(job_dir(uuid.UUID(job["id"])) / "checkpoint.pt", weights_only=False)["model"]
    pretrained, _ = load_saved_encoder(folder[base] / "encoder.pt")
    weight = "stem.0.0.weight"  # the first convolution
    start, end = pretrained.state_dict()[weight], trained[f"model.encoder.{weight}"].cpu()
    assert (start - end).abs().max() > 1e-3  # the epoch moved it
    torch.testing.assert_close(served[f"encoder.{weight}"], (start + end) / 2)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "simclr-tiny", "wise_ft": 0}, "wise_ft"),
        ({"model": "simclr-tiny", "wise_ft": 1.5}, "wise_ft"),
        ({"family": "resnet1d", "wise_ft": 0.5}, "it needs 'model' (a pretrained version)"),
        (
            {"model": "simclr-tiny", "wise_ft": 0.5, "probe_first": False},
            "leave 'probe_first' out or give true",
        ),
        ({"model": "simclr-tiny", "wise_ft": 0.5, "ema_decay": 0.9}, "or 'ema_decay' (0.9), not both"),
        (
            {"model": "simclr-tiny", "method": "linear_probe", "wise_ft": 0.5},
            "goes with method 'finetune' only",
        ),
    ],
)
def test_a_bad_wise_ft_is_a_422_naming_it(client: TestClient, body: dict, expected: str) -> None:
    response = client.post("/jobs/finetune", json={"dataset": "ptbxl-500", "method": "finetune", **body})
    assert response.status_code == 422, response.text
    assert expected in response.text


def test_wise_ft_implies_lp_ft_where_the_familys_recipe_runs_without_it() -> None:
    from services.jobs.params import FinetuneParams

    def recipe(**given: float) -> dict:
        return FinetuneParams(model="m@1", dataset="x", method="finetune", **given).recipe("st_mem", "tiny")

    assert (recipe()["probe_first"], recipe()["wise_ft"]) == (False, 1.0)  # ST-MEM fine-tunes without LP-FT
    assert recipe(wise_ft=0.5)["probe_first"] is True
