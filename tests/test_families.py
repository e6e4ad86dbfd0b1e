"""Model families: the registration table, the convolutional family (supervised from scratch through a
fine-tuning job, served by /predict), cross-validation splits, recipes and the best-epoch rule."""

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from services.datasets.kinds import open_dataset
from services.db.models import ModelVersion
from services.db.session import session_scope
from services.jobs.downstream import BestEpoch, LayerDecayLoss
from services.jobs.params import PROBE_RECIPE, FinetuneParams, PretrainParams
from services.jobs.pretrain import build_objective, input_spec
from services.models import ecg_jepa, resnet1d, st_mem
from services.models.checkpoints import load_saved_encoder, save_encoder
from services.models.families import FAMILIES, family_of
from services.models.heads import DiagnosisModel, LinearHead
from services.models.methods import catalogue
from tests.test_api import wfdb_files
from tests.test_downstream import finished, post_job

RECORD = "ptbxl-500/records500/00000/00010_hr"


def test_every_family_builds_its_encoder_objective_and_round_trips_its_saved_weights(tmp_path: Path) -> None:
    for name, f in FAMILIES.items():
        cfg = f.sizes["tiny"]
        spec = f.input_spec(cfg)
        encoder = f.encoder_class(cfg).eval()
        x = torch.randn(2, len(spec.leads), spec.samples)
        assert encoder(x).shape == (2, cfg.width), name
        params = PretrainParams(dataset="x", method=f.method, model_size="tiny", epochs=1)
        assert input_spec(params) == spec
        objective = build_objective(params)
        loss = objective(torch.randn(4, len(spec.leads), spec.samples))
        assert loss.ndim == 0 and torch.isfinite(loss), name
        assert family_of(objective.encoder) is f
        save_encoder(encoder, tmp_path / f"{name}.pt")
        loaded, family = load_saved_encoder(tmp_path / f"{name}.pt")
        assert family == name and type(loaded) is f.encoder_class
        torch.testing.assert_close(loaded(x), encoder(x))


def test_pretraining_defaults_are_the_recipe_of_the_method_and_size() -> None:
    tiny = PretrainParams(dataset="x", method="st_mem", model_size="tiny")
    assert (tiny.learning_rate, tiny.batch_size, tiny.epochs) == (3e-3, 32, 480)  # was 1.9e-5 at batch 32
    assert PretrainParams(dataset="x", method="st_mem", batch_size=64).learning_rate == pytest.approx(6e-3)
    jepa = PretrainParams(dataset="x", method="ecg_jepa")
    assert (jepa.learning_rate, jepa.weight_decay, jepa.epochs) == (1e-3, 0.05, 120)  # was 30: probe 0.759
    given = PretrainParams(dataset="x", learning_rate=1e-4, epochs=3, weight_decay=0.0)
    assert (given.learning_rate, given.epochs, given.weight_decay) == (1e-4, 3, 0.0)
    cnn = PretrainParams(dataset="x", method="simclr", model_size="base")
    assert cnn.batch_size == resnet1d.FAMILY.pretrain_recipes["base"].batch_size
    with pytest.raises(ValueError, match="does not exist for simclr"):
        PretrainParams(dataset="x", method="simclr", model_size="small")


def test_finetune_recipe_comes_from_the_family_and_what_was_given_wins() -> None:
    p = FinetuneParams(family="resnet1d", dataset="x", method="finetune")
    assert p.model_size == "base"
    r = p.recipe("resnet1d", "base")
    assert r["learning_rate"] == 1e-2 and r["batch_size"] == 64 and r["layer_decay"] == 1.0
    r = FinetuneParams(model="m@1", dataset="x", method="finetune", batch_size=16).recipe("st_mem", "tiny")
    assert r["batch_size"] == 16 and r["learning_rate"] == pytest.approx(1e-3 * 16 / 32)
    assert r["layer_decay"] == 0.75 and r["augment"] is False
    for bad, match in [
        ({}, "either 'model'"),
        ({"model": "m@1", "family": "resnet1d"}, "either 'model'"),
        ({"model": "m@1", "model_size": "tiny"}, "goes with 'family'"),
        ({"family": "resnet1d", "model_size": "small"}, "does not exist for resnet1d"),
        ({"family": "resnet1d", "test_fold": 11}, "less than or equal to 10"),
    ]:
        with pytest.raises(ValueError, match=match):
            FinetuneParams(dataset="x", method="finetune", **bad)


def test_layer_decay_and_probe_first_are_off_from_scratch_unless_given() -> None:
    for family, spec in FAMILIES.items():
        for size in spec.sizes:
            scratch = FinetuneParams(family=family, model_size=size, dataset="x", method="finetune")
            r = scratch.recipe(family, size)
            assert (r["layer_decay"], r["probe_first"]) == (1.0, False), (family, size)
            recipe = spec.finetune_recipes.get(size) or next(iter(spec.finetune_recipes.values()))
            r = FinetuneParams(model="m@1", dataset="x", method="finetune").recipe(family, size)
            assert (r["layer_decay"], r["probe_first"]) == (recipe.layer_decay, recipe.probe_first)
    given = {"probe_first": True, "layer_decay": 0.5}
    r = FinetuneParams(family="resnet1d", dataset="x", method="finetune", **given).recipe("resnet1d", "base")
    assert (r["layer_decay"], r["probe_first"]) == (0.5, True)
    probe = FinetuneParams(model="m@1", dataset="x", method="linear_probe").recipe("resnet1d", "tiny")
    assert probe["probe_first"] is False and probe["learning_rate"] == 1e-2


def test_the_linear_probe_trains_its_head_as_long_as_the_family_and_size_recipe_says() -> None:
    """ECG-JEPA tiny's probe head trains 40 epochs (chosen on the validation folds), every other 10; given
    epochs win; LP-FT's first stage and the other downstream methods keep the probe recipe's 10."""

    def epochs(family: str, size: str, method: str = "linear_probe", **given: int) -> int:
        return FinetuneParams(model="m@1", dataset="x", method=method, **given).recipe(family, size)["epochs"]

    assert epochs("ecg_jepa", "tiny") == 40
    others = [("ecg_jepa", "base"), ("st_mem", "tiny"), ("resnet1d", "tiny"), ("resnet1d", "base")]
    assert [epochs(family, size) for family, size in others] == [10] * 4
    assert epochs("ecg_jepa", "tiny", epochs=5) == 5
    assert epochs("ecg_jepa", "tiny", method="finetune") == 30
    assert epochs("ecg_jepa", "tiny", method="triplet") == 10
    assert [m["finetune_recipe"]["linear_probe_epochs"] for f in catalogue() if f["name"] == "ecg_jepa"
            for m in f["sizes"]] == [40, 10]  # fmt: skip
    assert PROBE_RECIPE["epochs"] == 10


def test_probe_first_starts_fine_tuning_from_a_head_fitted_on_the_frozen_encoder(client: TestClient) -> None:
    """At a learning rate too small to move anything, the first epoch's validation figure is the head's
    starting point: LP-FT's (fitted on the frozen features) against a random head's."""
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "record_limit": 300, "epochs": 1, "learning_rate": 1e-9, "seed": 1}  # fmt: skip
    plain = finished(client, post_job(client, "finetune", body))
    lpft = finished(client, post_job(client, "finetune", {**body, "probe_first": True}))
    assert lpft["result"]["recipe"]["probe_first"] is True and "probe_val_macro_auroc" not in plain["result"]
    probe = lpft["result"]["probe_val_macro_auroc"]
    first = {j["id"]: j["metrics"][0]["values"]["val_macro_auroc"] for j in (plain, lpft)}
    assert first[lpft["id"]] > first[plain["id"]] + 0.1, (first, probe)
    assert abs(first[lpft["id"]] - probe) < 0.1  # windows of the records the probe saw as 3-crop means


def test_cross_validation_folds_test_k_validate_the_next_and_train_on_the_rest(ptbxl_dir: Path) -> None:
    ds = open_dataset("ptbxl", ptbxl_dir)
    default = {s: set(ds.split(s).tolist()) for s in ("train", "val", "test")}
    assert {int(f) for f in ds.folds[list(default["test"])]} == {10}
    assert {int(f) for f in ds.folds[list(default["val"])]} == {9}
    for k in (1, 5, 10):
        parts = {s: ds.split(s, test_fold=k) for s in ("train", "val", "test")}
        assert set(ds.folds[parts["test"]]) == {k} and set(ds.folds[parts["val"]]) == {k % 10 + 1}
        assert not set(ds.folds[parts["train"]]) & {k, k % 10 + 1}
        assert sum(len(v) for v in parts.values()) == len(ds)
    assert set(ds.folds[ds.split("val", test_fold=10)]) == {1}  # the default (val 9) is not "the next"


def test_layer_decay_scales_blocks_geometrically_and_keeps_the_head_at_full_lr() -> None:
    encoder = st_mem.StMemEncoder(st_mem.SIZES["tiny"])
    model = DiagnosisModel(encoder, LinearHead(encoder.cfg.width, 5))
    groups = LayerDecayLoss(model, st_mem.FAMILY.blocks(encoder), 0.5).param_groups(0.05)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(model.head.linear.weight)] == 1.0
    assert scale_of[id(encoder.blocks[1].attn.fn.to_qkv.weight)] == 0.5  # last of 2 blocks
    assert scale_of[id(encoder.blocks[0].attn.fn.to_qkv.weight)] == 0.25
    assert scale_of[id(encoder.to_patch_embedding[2].weight)] == 0.125  # the tokeniser
    assert {g["weight_decay"] for g in groups if any(p.ndim < 2 for p in g["params"])} == {0.0}
    assert len(scale_of) == sum(1 for p in model.parameters() if p.requires_grad)
    cnn = resnet1d.Resnet1dEncoder(resnet1d.SIZES["tiny"])
    plain = LayerDecayLoss(DiagnosisModel(cnn, LinearHead(cnn.cfg.width, 5)), [], 1.0).param_groups(0.01)
    assert len(plain) == 1 and "lr_scale" not in plain[0]


def test_best_epoch_is_kept_on_disk_and_restored(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    best = BestEpoch(tmp_path / "best.pt", "auc")
    best.update(model, 1, {"auc": 0.6})
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    best.update(model, 2, {"auc": 0.5})  # worse: not kept
    assert best.epoch == 1
    resumed = BestEpoch(tmp_path / "best.pt", "auc")  # a redelivered job finds it
    assert resumed.epoch == 1 and resumed.value == 0.6
    assert resumed.restore(model)
    torch.testing.assert_close(model.weight, kept)


def test_the_cnn_reads_millivolts_and_per_lead_z_scored_records_alike() -> None:
    torch.manual_seed(0)
    encoder = resnet1d.Resnet1dEncoder(resnet1d.SIZES["tiny"]).eval()
    x = torch.randn(2, 12, 250).cumsum(-1)
    gains = torch.rand(1, 12, 1) * 3 + 0.1
    z = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True) * gains + 5.0
    torch.testing.assert_close(encoder(x), encoder(z), atol=1e-4, rtol=1e-4)


def test_simclr_lead_masking_flattens_a_share_of_leads_and_keeps_the_rest_of_the_view(data_dir: Path) -> None:
    signals = np.load(data_dir / "ptbxl-unlabelled" / "ptbxl_unlabelled_250hz.npz")["signals"]
    windows = torch.from_numpy(signals[:64, :, :250].astype(np.float32))  # real pretraining records, 1 s each
    plain = resnet1d.augment(windows, resnet1d.SimClrConfig(lead_mask=0.0), torch.Generator().manual_seed(3))
    masked = resnet1d.augment(windows, resnet1d.SimClrConfig(), torch.Generator().manual_seed(3))  # 0.2
    flat = masked.abs().amax(dim=-1) == 0  # (64, 12)
    assert 0.15 < flat.float().mean() < 0.25, flat.float().mean()  # 768 leads at p 0.2: sd 0.014
    assert not (plain.abs().amax(dim=-1) == 0).any()
    torch.testing.assert_close(masked[~flat], plain[~flat])  # the same view where a lead is kept
    assert (resnet1d.standardise_leads(masked)[flat] == 0).all()  # the encoder sees a flat lead as zeros


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_resnet1d_trained_from_scratch_by_a_finetune_job_is_served_by_predict(
    client: TestClient, data_dir: Path, ptb_record: Path
) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "record_limit": 120, "epochs": 3, "test_fold": 3,
            "model_name": f"cnn-{uuid.uuid4().hex[:6]}"}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    result = job["result"]
    assert result["base_model"] is None and result["recipe"]["learning_rate"] == 1e-2
    assert result["records"]["test"] > 0 and result["parity_max_abs_diff"] < 1e-3
    folds = open_dataset("ptbxl", data_dir / "ptbxl-500").folds[:120]
    assert result["records"] == {"train": int(np.isin(folds, [1, 2, 5, 6, 7, 8, 9, 10]).sum()),
                                 "val": int((folds == 4).sum()), "test": int((folds == 3).sum())}  # fmt: skip
    epochs = [m["values"]["val_macro_auroc"] for m in job["metrics"]]
    assert len(epochs) == 3 and result["best_epoch"] == int(np.argmax(epochs)) + 1
    assert result["kept"].startswith("best validation epoch")
    assert 0.0 <= result["crossfit_val_macro_auroc"] <= 1.0  # the epoch chosen and read on different halves
    ref = job["model_version"]
    with session_scope() as s:
        version = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one()
        assert version.input_spec["fs"] == 100.0 and version.input_spec["samples"] == 250
        assert version.metrics["encoder_family"] == "resnet1d" and version.embedding_dim == 128

    record = data_dir / RECORD
    mv = client.post(f"/predict?model={ref}&precision=fp32", files=wfdb_files(record, ".hea", ".dat"))
    assert mv.status_code == 200, mv.text
    assert mv.json()["record"]["windows"] == 3  # 3 crops of 2.5 s from the 10-s record
    # the same record as public preprocessed sets ship it: z-scored per lead, no mV
    from services.ecg.readers import read_wfdb

    signal = read_wfdb(record.with_suffix(".hea")).signal
    z = (signal - signal.mean(1, keepdims=True)) / signal.std(1, keepdims=True)
    zs = client.post(f"/predict?model={ref}&precision=fp32", files=[("files", ("z.npy", npy(z)))],
                     data={"fs": "500"})  # fmt: skip
    assert zs.status_code == 200, zs.text
    got_mv = np.array(list(mv.json()["probabilities"].values()))
    got_z = np.array(list(zs.json()["probabilities"].values()))
    np.testing.assert_allclose(got_z, got_mv, atol=0.02)
    ptb = client.post(f"/predict?model={ref}", files=wfdb_files(ptb_record, ".hea", ".dat", ".xyz"))
    assert ptb.status_code == 200 and ptb.json()["record"]["windows"] == 9


def test_vqvae_on_a_convolutional_encoder_is_a_4xx_that_names_the_families_that_can(
    client: TestClient,
) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "vqvae",
            "record_limit": 60, "epochs": 1}  # fmt: skip
    job_id = post_job(client, "finetune", body)
    from tests.test_downstream import run_job

    job = run_job(job_id)
    assert job.status == "failed" and "st_mem, ecg_jepa" in job.error and "resnet1d" in job.error


def test_ecg_jepa_family_keeps_its_lead_tokens_accessor() -> None:
    encoder = ecg_jepa.EcgJepaEncoder(ecg_jepa.SIZES["tiny"])
    tokens = ecg_jepa.FAMILY.tokens(encoder).forward_tokens(torch.randn(1, 8, 2500))
    assert tokens.shape == (1, 8, 50, 64)


def test_an_ensemble_finetune_serves_the_mean_of_its_members(client: TestClient, data_dir: Path) -> None:
    body = {"family": "resnet1d", "model_size": "tiny", "dataset": "ptbxl-500", "method": "finetune",
            "record_limit": 100, "epochs": 2, "ensemble": 2, "seed": 3}  # fmt: skip
    job = finished(client, post_job(client, "finetune", body))
    result = job["result"]
    assert result["recipe"]["ensemble"] == 2 and len(result["members"]) == 2
    assert 0.0 <= result["crossfit_val_macro_auroc"] <= 1.0  # of the members' average
    names = {name for m in job["metrics"] for name in m["values"]}
    assert {"val_macro_auroc", "member2_val_macro_auroc"} <= names
    with session_scope() as s:
        version = s.query(ModelVersion).filter_by(source_job_id=uuid.UUID(job["id"])).one()
        assert version.embedding_dim == 2 * 128
        folder = Path(version.onnx_path).parent
    state = torch.load(folder / "downstream.pt", weights_only=True)["state_dict"]
    members = []
    for k in range(2):
        encoder = resnet1d.Resnet1dEncoder(resnet1d.SIZES["tiny"])
        member = DiagnosisModel(encoder, LinearHead(encoder.cfg.width, 5))
        prefix = f"members.{k}."
        member.load_state_dict({n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)})
        members.append(member.eval())
    x = torch.randn(2, 12, 250)
    with torch.no_grad():
        expected = (members[0].probabilities(x) + members[1].probabilities(x)) / 2
        assert not torch.allclose(members[0].probabilities(x), members[1].probabilities(x))  # two models
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"))
    embedding, probabilities = session.run(None, {"signal": x.numpy()})
    assert embedding.shape == (2, 256)
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="'ensemble' goes with method 'finetune'"):
        FinetuneParams(family="resnet1d", dataset="x", method="linear_probe", ensemble=2)


def test_a_simclr_pretraining_job_registers_a_cnn_encoder_that_embeds_uploads(
    client: TestClient, ptb_record: Path
) -> None:
    body = {"dataset": "ptbxl-500", "method": "simclr", "model_size": "tiny", "epochs": 2, "batch_size": 16,
            "record_limit": 40, "model_name": f"simclr-{uuid.uuid4().hex[:6]}"}  # fmt: skip
    job = finished(client, post_job(client, "pretrain", body))
    losses = [m["values"]["train_loss"] for m in job["metrics"]]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    assert job["params"]["learning_rate"] == pytest.approx(1e-3 * 16 / 128)  # the recipe, scaled to the batch
    ref = job["model_version"]
    name, number = ref.split("@")
    version = client.get(f"/models/{name}/versions/{number}").json()
    assert version["input_spec"]["fs"] == 100.0 and version["embedding_dim"] == 128
    assert version["parity_max_abs_diff"] < 1e-3
    embedded = client.post(f"/embed?model={ref}", files=wfdb_files(ptb_record, ".hea", ".dat"))
    assert embedded.status_code == 200, embedded.text
    assert embedded.json()["dimension"] == 128 and len(embedded.json()["embedding"]) == 128
