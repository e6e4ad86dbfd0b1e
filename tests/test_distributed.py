"""Data parallelism: 2 processes (gloo, CPU) train exactly as 1 process on the same global batches.

Real PTB-XL records, a tiny ST-MEM MAE, fp32 (bf16 rounding would hide what is compared). Two ranks are
started with ``torch.multiprocessing`` and the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so ``train()`` finds them and joins the group itself, as under torchrun.
"""

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from services.datasets.cache import preprocessed
from services.datasets.ptbxl import PtbxlDataset
from services.ecg.preprocess import InputSpec
from services.models.st_mem import SIZES, StMemMae
from services.training.distributed import DistContext, is_main_process, torchrun_env
from services.training.loop import Cancelled, CropDataset, TrainConfig, train

WORLD = 2
GLOBAL_BATCH = 8
CPU = torch.device("cpu")


class Objective(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mae = StMemMae(SIZES["tiny"])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.mae(batch)


def _config(**overrides) -> TrainConfig:
    values = {"epochs": 2, "batch_size": GLOBAL_BATCH, "learning_rate": 3e-3, "warmup_epochs": 0.0}
    return TrainConfig(**{**values, "amp": False, "checkpoint_every": 1, **overrides})


def _datasets(data: Path) -> tuple[CropDataset, CropDataset]:
    signals = np.load(data / "signals.npy")  # (24, 12, 2500): 16 to train (random crops), 8 held out
    return (
        CropDataset(signals, 2250, random_crop=True, seed=0, indices=np.arange(16)),
        CropDataset(signals, 2250, random_crop=False, indices=np.arange(16, 24)),
    )


def _run_training(data: Path, out: Path) -> dict:
    """train() for 2 epochs of 2 global steps; the per-step losses as ``on_progress`` reports them."""
    train_set, val_set = _datasets(data)
    steps: list[float] = []
    epochs: list[dict] = []
    result = train(
        Objective(),
        train_set,
        _config(),
        CPU,
        out / "checkpoint.pt",
        val_set=val_set,
        on_progress=lambda p: steps.append(p.loss),
        on_epoch=lambda epoch, metrics: epochs.append(metrics),
        progress_interval_s=0.0,
    )
    return {"steps": steps, "epochs": epochs, "history": result.history}


def _first_gradients(data: Path, ctx: DistContext) -> dict:
    """Loss and gradients (averaged by DDP) of one forward/backward on the first global batch."""
    train_set, _ = _datasets(data)
    batch = torch.stack([train_set[i] for i in range(GLOBAL_BATCH)])[ctx.rank :: ctx.world_size]
    model = Objective()
    ctx.setup_model(model)
    wrapped = ctx.wrap(model)
    torch.manual_seed(7)
    loss = wrapped(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": ctx.mean(loss), "grads": grads}


def _worker(rank: int, data: Path, ports: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    out = data / "ddp"
    result: dict = {"env": torchrun_env(), "main": is_main_process()}

    # 1. train() joins the group from the torchrun variables, trains, leaves it again
    os.environ["MASTER_PORT"] = str(ports[0])
    result["training"] = _run_training(data, out)
    result["group_left"] = not dist.is_initialized()

    # 2. a group made by the caller: gradients of one step; then a cancel that only rank 0 is asked
    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ctx = DistContext(rank=rank, world_size=WORLD, device=CPU)
    result["first"] = _first_gradients(data, ctx)

    asked: list[int] = []

    def cancel_on_second_step() -> bool:
        asked.append(rank)
        return len(asked) == 2

    train_set, _ = _datasets(data)
    try:
        train(
            Objective(),
            train_set,
            _config(),
            CPU,
            data / "cancel" / "ckpt.pt",
            should_cancel=cancel_on_second_step,
        )
    except Cancelled as exc:
        result["cancelled"] = str(exc)
    result["asked"] = asked
    result["group_kept"] = dist.is_initialized()  # train() did not make it, so it does not end it
    dist.destroy_process_group()
    torch.save(result, data / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real PTB-XL records prepared at 250 Hz, (24, 12, 2500), saved where the ranks can read them."""
    root = tmp_path_factory.mktemp("ddp")
    dataset = PtbxlDataset(ptbxl_dir)
    cache = preprocessed(
        dataset, {"path": str(ptbxl_dir)}, InputSpec(), root / "cache", indices=dataset.split("train")[:24]
    )
    np.save(root / "signals.npy", np.array(cache.signals))
    return root


@pytest.fixture(scope="module")
def ranks(data: Path) -> list[dict]:
    assert torchrun_env() is None  # the test process itself is a single one
    ranks = mp.start_processes(
        _worker, args=(data, (_free_port(), _free_port())), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the 2 ranks did not finish within 120 s")
    return [torch.load(data / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(data: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        result = _run_training(data, data / "single")
        result["first"] = _first_gradients(data, DistContext())
    finally:
        torch.set_num_threads(threads)
    return result


def test_two_processes_train_as_one(data: Path, ranks: list[dict], single: dict):
    assert [r["env"].rank for r in ranks] == [0, 1]
    assert [r["main"] for r in ranks] == [True, False]
    assert all(r["group_left"] for r in ranks)
    main, other = ranks[0]["training"], ranks[1]["training"]

    # the first step's loss (mean over the ranks) is the single process's loss on the same global batch
    assert len(single["steps"]) == len(main["steps"]) == 4
    np.testing.assert_allclose(main["steps"], single["steps"], rtol=1e-5)
    # only rank 0 reports; every rank keeps the same history
    assert other["steps"] == [] and other["epochs"] == []
    timing = ("samples_per_s", "epoch_s")  # each rank's own clock
    assert [{k: v for k, v in h.items() if k not in timing} for h in main["history"]] == [
        {k: v for k, v in h.items() if k not in timing} for h in other["history"]
    ]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(
            [h[key] for h in main["history"]], [h[key] for h in single["history"]], rtol=1e-5, err_msg=key
        )
    assert [m["val_loss"] for m in main["epochs"]] == [h["val_loss"] for h in main["history"]]

    # after 4 steps the weights (written by rank 0 only) are the single process's
    assert not (data / "ddp" / "checkpoint.tmp").exists()
    ddp_state = torch.load(data / "ddp" / "checkpoint.pt", weights_only=False)
    single_state = torch.load(data / "single" / "checkpoint.pt", weights_only=False)
    assert ddp_state["epoch"] == single_state["epoch"] == 2
    assert ddp_state["model"].keys() == single_state["model"].keys()
    initial = Objective().state_dict()
    moved = 0
    for key, value in single_state["model"].items():
        got = ddp_state["model"][key]
        moved += not torch.equal(value, initial[key])
        if key.endswith("to_qkv.bias"):
            # The key bias has a zero gradient in exact arithmetic (softmax ignores a shift of each row
            # of logits); Adam divides its rounding noise by its own size, so only q and v are compared.
            third = value.shape[0] // 3
            got, value = (
                torch.cat([got[:third], got[2 * third :]]),
                torch.cat([value[:third], value[2 * third :]]),
            )
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert moved > 10  # the comparison is about weights that did change


def test_two_processes_compute_the_single_process_gradients(ranks: list[dict], single: dict):
    expected = single["first"]
    for rank in ranks:
        got = rank["first"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_only_rank_0_decides_to_cancel_and_all_stop_together(ranks: list[dict], data: Path):
    assert ranks[0]["asked"] == [0, 0]
    assert ranks[1]["asked"] == []  # never asked: it follows rank 0's broadcast answer
    assert [r["cancelled"] for r in ranks] == ["cancelled at epoch 1, step 1"] * 2
    assert all(r["group_kept"] for r in ranks)
    assert not (data / "cancel" / "ckpt.pt").exists()


def test_batch_must_split_evenly():
    ctx = DistContext(rank=0, world_size=3)
    assert ctx.local_batch_size(12) == 4
    with pytest.raises(ValueError, match="not divisible"):
        ctx.local_batch_size(8)


def test_sampler_deals_global_batches_round_robin():
    dataset = list(range(20))
    alone = list(DistContext().sampler(dataset, seed=3))
    dealt = [list(DistContext(rank=r, world_size=2).sampler(dataset, seed=3)) for r in range(2)]
    assert sorted(alone) == dataset
    assert dealt[0] == alone[0::2] and dealt[1] == alone[1::2]
    shards = [list(DistContext(rank=r, world_size=3).eval_shard(dataset)) for r in range(3)]
    assert sorted(sum(shards, [])) == dataset  # every held-out sample once, none padded


def test_masking_noise_is_the_global_batch_rows():
    mae = StMemMae(SIZES["tiny"])
    torch.manual_seed(5)
    full = mae.masking_noise(6, 12, 30, CPU)
    for rank in range(3):
        mae.set_data_shard(rank, 3)
        torch.manual_seed(5)
        torch.testing.assert_close(mae.masking_noise(2, 12, 30, CPU), full[rank::3])


@pytest.mark.parametrize(
    "data",
    [
        {"dataset": "ptbxl-500", "record_limit": 30},
        {
            "dataset": [
                {"dataset": "ptbxl-500", "folds": [1, 2], "record_limit": 16},
                {"dataset": "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz", "record_limit": 16},
            ]
        },
    ],
    ids=["one-dataset", "two-datasets"],
)
def test_a_pretraining_job_starts_itself_under_torchrun(
    settings_env: pytest.MonkeyPatch, ptbxl_dir: Path, data: dict
) -> None:
    """ECGSSL_TRAIN_PROCESSES=2: the worker launches torchrun (2 gloo processes), rank 0 alone reports, the
    worker exports and registers; the epochs' losses are those of the same job in one process (every
    process re-opens the same plan: with several datasets too)."""
    from services.db.models import Job, ModelVersion
    from services.db.session import session_scope
    from services.jobs.params import PretrainParams
    from services.jobs.pretrain import run_pretrain_job
    from services.jobs.store import create_job

    settings_env.setenv("ECGSSL_DEVICE", "cpu")
    params = PretrainParams(**data, epochs=2, batch_size=8, learning_rate=1e-3, checkpoint_every=1)
    runs = {}
    for processes in (1, 2):
        settings_env.setenv("ECGSSL_TRAIN_PROCESSES", str(processes))
        from services.config import get_settings

        get_settings.cache_clear()
        with session_scope() as s:
            job_id = create_job(s, "pretrain", params, params.epochs).id
        assert run_pretrain_job(job_id, worker="test-worker") == "succeeded"
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job.status == "succeeded", job.error
            losses = [(m.epoch, m.value) for m in job.metrics if m.name == "train_loss"]
            version = s.query(ModelVersion).filter_by(source_job_id=job_id).one()
            runs[processes] = (sorted(losses), version.metrics, job_id)
    log = Path(get_settings().artifact_dir) / "jobs" / str(runs[2][2]) / "torchrun.log"
    assert log.is_file() and "rank" in log.read_text()  # the processes ran under torchrun and logged there
    assert not (Path(get_settings().artifact_dir) / "jobs" / str(runs[1][2]) / "torchrun.log").exists()
    one, two = runs[1][0], runs[2][0]
    assert [e for e, _ in two] == [1, 2]  # each epoch recorded once, by rank 0 alone
    # same global batches and masks; bf16 autocast rounding differs a little with the per-process batch
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=5e-3)
    assert runs[2][1]["train_segments"] == runs[1][1]["train_segments"]
    assert runs[2][1]["datasets"] == runs[1][1]["datasets"]
    expected_records = [30] if "record_limit" in data else [16, 16]
    assert [d["records"] for d in runs[1][1]["datasets"]] == expected_records


def test_a_several_dataset_plan_reopens_identically(
    settings_env: pytest.MonkeyPatch, ptbxl_dir: Path
) -> None:
    """What torchrun ranks and a redelivered (resuming) task rely on: re-planning a job of several datasets
    re-opens the same caches (not rebuilt) with the same per-dataset hold-outs, in the same order."""
    from services.db.models import Job
    from services.db.session import session_scope
    from services.jobs.params import PretrainParams
    from services.jobs.pretrain import _plan
    from services.jobs.runner import JobReporter
    from services.jobs.store import create_job

    params = PretrainParams(
        dataset=[
            {"dataset": "ptbxl-unlabelled/ptbxl_unlabelled_250hz.npz", "record_limit": 24},
            {"dataset": "ptbxl-500", "folds": [3], "record_limit": 12},
        ],
        epochs=1,
        seed=5,
    )
    with session_scope() as s:
        job_id = create_job(s, "pretrain", params, params.epochs).id
    first, again = (_plan(job_id, params, JobReporter(job_id)) for _ in range(2))
    for a, b in zip(first.parts, again.parts, strict=True):
        assert a.cache.path == b.cache.path and a.cache.meta == b.cache.meta
        np.testing.assert_array_equal(a.train_idx, b.train_idx)
        np.testing.assert_array_equal(a.val_idx, b.val_idx)
    assert [len(p.val_idx) for p in first.parts] == [2, 1]  # 10 % of each dataset's records, held out whole
    assert set(first.parts[1].cache.folds.tolist()) == {3}
    with session_scope() as s:
        assert [d["records"] for d in s.get(Job, job_id).result["datasets"]] == [24, 12]


def test_a_batch_that_does_not_split_between_processes_fails_the_job_clearly(
    settings_env: pytest.MonkeyPatch, ptbxl_dir: Path
) -> None:
    from services.db.models import Job
    from services.db.session import session_scope
    from services.jobs.params import PretrainParams
    from services.jobs.pretrain import run_pretrain_job
    from services.jobs.store import create_job

    settings_env.setenv("ECGSSL_DEVICE", "cpu")
    settings_env.setenv("ECGSSL_TRAIN_PROCESSES", "2")
    params = PretrainParams(dataset="ptbxl-500", epochs=1, batch_size=7, record_limit=12)
    with session_scope() as s:
        job_id = create_job(s, "pretrain", params, params.epochs).id
    assert run_pretrain_job(job_id, worker="test-worker") == "failed"
    with session_scope() as s:
        error = s.get(Job, job_id).error
    assert "batch_size 7" in error and "2 training processes" in error


def test_cancelling_a_torchrun_job_stops_every_process(
    settings_env: pytest.MonkeyPatch, ptbxl_dir: Path
) -> None:
    import subprocess
    import threading

    from services.db.models import Job
    from services.db.session import session_scope
    from services.jobs.params import PretrainParams
    from services.jobs.pretrain import run_pretrain_job
    from services.jobs.store import create_job, request_cancel

    settings_env.setenv("ECGSSL_DEVICE", "cpu")
    settings_env.setenv("ECGSSL_TRAIN_PROCESSES", "2")
    params = PretrainParams(dataset="ptbxl-500", epochs=500, batch_size=4, record_limit=12)
    with session_scope() as s:
        job_id = create_job(s, "pretrain", params, params.epochs).id
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(run_pretrain_job(job_id, worker="test-worker")))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with session_scope() as s:
            if (s.get(Job, job_id).step or 0) > 0:  # rank 0 is reporting steps: training is under way
                request_cancel(s, job_id)
                break
        time.sleep(0.2)
    runner.join(timeout=60)
    assert outcome == ["cancelled"]
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == "cancelled" and job.epoch < params.epochs
    left = subprocess.run(["pgrep", "-f", f"services.jobs.pretrain {job_id}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""  # no training process outlives the job
