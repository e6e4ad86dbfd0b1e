"""Pretraining jobs: parameters, and the run that trains, exports, checks and registers an encoder."""

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.config import get_settings
from services.dataset_registry import dataset_for_job, open_registered
from services.datasets.base import EcgDataset
from services.datasets.cache import PreprocessedCache, preprocessed
from services.db.models import Job
from services.db.session import session_scope
from services.ecg.clinical import CLINICAL_FEATURES, FeatureNormaliser, clinical_features_for
from services.ecg.preprocess import InputSpec
from services.errors import ClientError
from services.export.onnx import export_checked, sha256_file
from services.job_runner import JobReporter, run_job
from services.jobs import PretrainParams
from services.models.checkpoints import ENCODER_FILE, save_encoder
from services.models.families import family
from services.registry import register_model_version
from services.training.distributed import die_with_parent, is_main_process, log_tail, run_torchrun
from services.training.loop import (
    Cancelled,
    CropDataset,
    TrainConfig,
    TrainResult,
    pick_device,
    train,
)

log = logging.getLogger(__name__)


def run_pretrain_job(job_id: uuid.UUID, worker: str) -> str:
    """Run one pretraining job to its end and record the outcome (``services.job_runner.run_job``)."""
    return run_job(
        job_id, worker, lambda raw, reporter: _pretrain(job_id, PretrainParams.model_validate(raw), reporter)
    )


@dataclass
class TrainingPlan:
    """A job's training data, prepared once by the worker; every torchrun process re-opens it."""

    spec: InputSpec
    dataset: EcgDataset
    identity: dict
    cache: PreprocessedCache
    train_records: np.ndarray  # positions in cache.record_ids
    train_idx: np.ndarray  # segments (rows of cache.signals)
    val_idx: np.ndarray
    job_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.job_dir / "checkpoint.pt"


def training_processes(requested: int, device: torch.device) -> int:
    """How many processes train a job: the setting, or 0 = one per visible CUDA GPU (1 on the CPU)."""
    if requested == 0:
        return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    if device.type == "cuda" and requested > torch.cuda.device_count():
        raise ValueError(
            f"ECGSSL_TRAIN_PROCESSES={requested} but only {torch.cuda.device_count()} CUDA GPU(s) are visible"
        )
    return requested


def _pretrain(job_id: uuid.UUID, params: PretrainParams, reporter: JobReporter) -> None:
    settings = get_settings()
    device = pick_device(settings.device)
    processes = training_processes(settings.train_processes, device)
    if params.batch_size % processes:
        raise ClientError(
            f"batch_size {params.batch_size} must be divisible by the {processes} training processes "
            "of this worker (the global batch is split evenly between them)"
        )
    plan = _plan(job_id, params, reporter)
    if processes > 1:
        model, resumed_from = _fit_under_torchrun(job_id, params, plan, reporter, processes, device)
    else:
        model, result = _fit(plan, params, reporter, device)
        resumed_from = result.resumed_from_epoch
    _export_and_register(job_id, params, plan, model.encoder, resumed_from, reporter)


def _plan(job_id: uuid.UUID, params: PretrainParams, reporter: JobReporter) -> TrainingPlan:
    """Open the dataset, build (or re-open) its preprocessed cache, hold out the validation records."""
    settings = get_settings()
    spec = input_spec(params)
    reporter.phase("opening the dataset")
    with session_scope() as s:
        job = s.get(Job, job_id)
        row = job.dataset if job.dataset is not None else dataset_for_job(s, params.dataset)
        dataset, identity = open_registered(row)
    indices = np.arange(len(dataset))
    if params.folds:
        if dataset.folds is None:
            raise ClientError(f"dataset '{params.dataset}' has no folds, so 'folds' cannot select records")
        indices = indices[np.isin(dataset.folds, params.folds)]
    indices = indices[: params.record_limit]
    cache = preprocessed(
        dataset,
        identity,
        spec,
        Path(settings.artifact_dir) / "cache",
        indices=indices,
        on_progress=lambda done, total: reporter.phase(f"preprocessing records: {done}/{total}"),
    )

    # hold out whole records (all their segments) for the per-epoch validation loss
    rng = np.random.default_rng(params.seed)
    records = rng.permutation(len(cache.record_ids))
    n_val = int(round(len(records) * params.val_fraction)) if len(records) >= 10 else 0
    val_idx, train_idx = cache.segments_of(records[:n_val]), cache.segments_of(records[n_val:])
    if len(train_idx) < 2:
        raise ClientError(
            f"dataset '{params.dataset}' has {len(train_idx)} usable training segment(s); need >= 2"
        )
    job_dir = Path(settings.artifact_dir) / "jobs" / str(job_id)
    return TrainingPlan(spec, dataset, identity, cache, records[n_val:], train_idx, val_idx, job_dir)


def input_spec(params: PretrainParams) -> InputSpec:
    """What the method's encoder consumes (its family's input spec at the job's size)."""
    f = family(params.method)
    return f.input_spec(f.sizes[params.model_size])


def build_objective(params: PretrainParams) -> torch.nn.Module:
    """The method's pretraining model: ``model(batch) -> loss``, with the encoder to serve at ``.encoder``."""
    torch.manual_seed(params.seed)
    f = family(params.method)
    return f.objective(f.sizes[params.model_size], params)


def _fit(
    plan: TrainingPlan, params: PretrainParams, reporter: JobReporter, device: torch.device
) -> tuple[torch.nn.Module, TrainResult]:
    """Train the method's objective (resuming from the job's checkpoint if there is one); under torchrun
    every process runs this, and the loop lets only rank 0 report and write checkpoints."""
    model = build_objective(params)
    resuming = (
        " (resuming from its last checkpoint: the task was redelivered)" if plan.checkpoint.is_file() else ""
    )
    reporter.phase(
        f"training on {device.type}: {len(plan.train_idx)} segments, {len(plan.val_idx)} held out{resuming}"
    )
    signals, samples = plan.cache.signals, plan.spec.samples
    result = train(
        model,
        CropDataset(signals, samples, random_crop=True, seed=params.seed, indices=plan.train_idx),
        TrainConfig(
            epochs=params.epochs,
            batch_size=params.batch_size,
            learning_rate=params.peak_lr,
            weight_decay=params.decay,
            warmup_epochs=params.warmup_epochs,
            seed=params.seed,
            checkpoint_every=params.checkpoint_every,
            amp=family(params.method).amp(device.type),
        ),
        device,
        checkpoint_path=plan.checkpoint,
        val_set=CropDataset(signals, samples, random_crop=False, indices=plan.val_idx)
        if len(plan.val_idx)
        else None,
        on_progress=reporter.progress,
        on_epoch=reporter.epoch_metrics,
        should_cancel=reporter.should_cancel,
    )
    return model, result


def _fit_under_torchrun(
    job_id: uuid.UUID,
    params: PretrainParams,
    plan: TrainingPlan,
    reporter: JobReporter,
    processes: int,
    device: torch.device,
) -> tuple[torch.nn.Module, int]:
    """Train in ``processes`` torchrun processes (``main`` below), then load the final checkpoint."""
    resumed_from = (
        int(torch.load(plan.checkpoint, mmap=True, weights_only=False)["epoch"])
        if plan.checkpoint.is_file()
        else 0
    )
    reporter.phase(f"starting {processes} training processes under torchrun on {device.type}")
    threads = None if device.type == "cuda" else max(1, (os.cpu_count() or 1) // processes)
    log_path = plan.job_dir / "torchrun.log"
    code = run_torchrun("services.pretraining", [str(job_id)], processes, log_path, threads)
    if code != 0:
        if reporter.should_cancel():
            raise Cancelled("cancelled during training under torchrun")
        raise RuntimeError(
            f"torchrun training exited with code {code}; last lines of {log_path}:\n" + log_tail(log_path)
        )
    model = build_objective(params)
    model.load_state_dict(torch.load(plan.checkpoint, map_location="cpu", weights_only=False)["model"])
    return model, resumed_from


def _export_and_register(
    job_id: uuid.UUID,
    params: PretrainParams,
    plan: TrainingPlan,
    encoder: torch.nn.Module,
    resumed_from: int,
    reporter: JobReporter,
) -> None:
    reporter.phase("exporting the encoder to ONNX")
    encoder = encoder.to("cpu").float().eval()
    check_idx = (plan.val_idx if len(plan.val_idx) else plan.train_idx)[:8]
    check = CropDataset(plan.cache.signals, plan.spec.samples, random_crop=False, indices=check_idx)
    windows = np.stack([check[i].numpy() for i in range(len(check))])  # real records, centre crops
    onnx_path = plan.job_dir / "encoder.onnx"
    parity = export_checked(encoder, windows, onnx_path)
    save_encoder(encoder, onnx_path.with_name(ENCODER_FILE))  # what fine-tuning starts from
    embedding_dim = int(encoder(torch.from_numpy(windows[:1])).shape[-1])
    normaliser = None
    if params.clinical_features:
        normaliser = _fit_clinical_normaliser(plan, reporter)
        embedding_dim += 2 * len(CLINICAL_FEATURES)

    with session_scope() as s:
        history = s.get(Job, job_id).metrics
        final = {m.name: m.value for m in history if m.epoch == params.epochs}
        register_model_version(
            s,
            name=params.registry_name,
            method=params.method,
            source_job_id=job_id,
            onnx_path=str(onnx_path.resolve()),
            sha256=sha256_file(onnx_path),
            input_spec=plan.spec.to_dict(),
            embedding_dim=embedding_dim,
            clinical_normaliser=normaliser,
            parity_max_abs_diff=parity,
            metrics={
                **final,
                "records": len(plan.cache.record_ids),
                "train_segments": len(plan.train_idx),
                "skipped_records": len(plan.cache.meta["skipped"]),
                "resumed_from_epoch": resumed_from,
                "model_size": params.model_size,
            },
        )


def _fit_clinical_normaliser(plan: TrainingPlan, reporter: JobReporter) -> dict:
    """Clinical measurements of the job's training records (cached), and their normaliser fitted on them."""
    wanted = set(plan.cache.record_ids[plan.train_records].tolist())
    records = [i for i in range(len(plan.dataset)) if plan.dataset.record_id(i) in wanted]
    features = clinical_features_for(
        plan.dataset,
        records,
        cache_dir=Path(get_settings().artifact_dir) / "cache",
        identity=plan.identity,
        on_progress=lambda done, total: reporter.phase(f"clinical measurements: {done}/{total} records"),
    )
    return FeatureNormaliser.fit(features).to_dict()


def main(argv: list[str]) -> None:
    """One torchrun process of a job (``torch.distributed.run ... -m services.pretraining <job id>``).

    Every process re-opens the plan (the worker built the cache already) and trains; rank 0 alone writes
    progress, epoch metrics and checkpoints. The worker exports and registers once they have all exited.
    """
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(levelname)s %(message)s")
    job_id = uuid.UUID(argv[0])
    with session_scope() as s:
        params = PretrainParams.model_validate(dict(s.get(Job, job_id).params))
    reporter = JobReporter(job_id, writes=is_main_process())
    plan = _plan(job_id, params, reporter)
    _fit(plan, params, reporter, pick_device(get_settings().device))


if __name__ == "__main__":
    main(sys.argv[1:])
