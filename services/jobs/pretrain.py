"""Pretraining jobs: parameters, and the run that trains, exports, checks and registers an encoder."""

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session

from services.config import get_settings
from services.datasets.base import EcgDataset
from services.datasets.cache import PreprocessedCache, preprocessed
from services.datasets.registry import dataset_for_job, open_registered
from services.db.models import Job, ModelVersion
from services.db.session import session_scope
from services.ecg.clinical import CLINICAL_FEATURES, FeatureNormaliser, clinical_features_for
from services.ecg.preprocess import InputSpec
from services.errors import ClientError
from services.evaluation.plots import Caption, Figures, plot_history
from services.jobs.params import PretrainParams
from services.jobs.runner import JobReporter, run_job
from services.jobs.store import artifacts_dir, list_artifacts
from services.models.families import family
from services.registry import register_model_version
from services.registry.publish import Published, publish
from services.training.distributed import die_with_parent, is_main_process, log_tail, run_torchrun
from services.training.loop import (
    Cancelled,
    CropConcat,
    CropDataset,
    TrainConfig,
    TrainResult,
    pick_device,
    train,
)

log = logging.getLogger(__name__)


def run_pretrain_job(job_id: uuid.UUID, worker: str) -> str:
    """Run one pretraining job to its end and record the outcome (``services.jobs.runner.run_job``)."""
    return run_job(
        job_id, worker, lambda raw, reporter: _pretrain(job_id, PretrainParams.model_validate(raw), reporter)
    )


@dataclass
class PlanPart:
    """One dataset of a job (an entry of its ``dataset`` list, or its one dataset) and its cache."""

    name: str  # the registered dataset's name
    kind: str
    folds: list[int] | None
    record_limit: int | None
    dataset: EcgDataset
    identity: dict
    cache: PreprocessedCache
    train_records: np.ndarray  # positions in cache.record_ids
    train_idx: np.ndarray  # segments (rows of cache.signals)
    val_idx: np.ndarray

    def used(self) -> dict:
        """What went into the job from this dataset (the job's result and the model card list these)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "folds": self.folds,
            "record_limit": self.record_limit,
            "records": len(self.cache.record_ids),
            "segments": len(self.cache.record_index),
            "train_segments": len(self.train_idx),
            "val_segments": len(self.val_idx),
            "skipped": len(self.cache.meta["skipped"]),
        }


@dataclass
class TrainingPlan:
    """A job's training data, prepared once by the worker; every torchrun process re-opens it.

    One part per dataset; training samples the segments of all parts together (one global index over
    the parts' caches, ``CropConcat``), validation holds out whole records of each part."""

    spec: InputSpec
    parts: list[PlanPart]
    job_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.job_dir / "checkpoint.pt"

    @property
    def train_segments(self) -> int:
        return sum(len(p.train_idx) for p in self.parts)

    @property
    def val_segments(self) -> int:
        return sum(len(p.val_idx) for p in self.parts)

    def train_set(self, seed: int) -> CropConcat:
        samples = self.spec.samples
        return CropConcat(
            [
                CropDataset(p.cache.signals, samples, random_crop=True, seed=seed, indices=p.train_idx)
                for p in self.parts
            ]
        )

    def val_set(self) -> CropConcat:
        samples = self.spec.samples
        return CropConcat(
            [CropDataset(p.cache.signals, samples, random_crop=False, indices=p.val_idx) for p in self.parts]
        )

    def check_windows(self, count: int = 8) -> np.ndarray:
        """Centre crops of up to ``count`` real segments, held-out ones where a part has them, taken from
        every part in turn (for one part: its first ``count``)."""
        per_part = -(-count // len(self.parts))
        windows = []
        for p in self.parts:
            idx = (p.val_idx if len(p.val_idx) else p.train_idx)[:per_part]
            crops = CropDataset(p.cache.signals, self.spec.samples, random_crop=False, indices=idx)
            windows += [crops[i].numpy() for i in range(len(crops))]
        return np.stack(windows[:count])


def training_processes(requested: int, device: torch.device) -> int:
    """How many processes train a job: the setting, or 0 = one per visible CUDA GPU (1 on the CPU)."""
    if requested == 0:
        return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    if device.type == "cuda" and requested > torch.cuda.device_count():
        raise ValueError(
            f"ECGSSL_TRAIN_PROCESSES={requested} but only {torch.cuda.device_count()} CUDA GPU(s) are visible"
        )
    return requested


def _pretrain(job_id: uuid.UUID, params: PretrainParams, reporter: JobReporter) -> dict:
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
    ref = _export_and_register(job_id, params, plan, model.encoder, resumed_from, reporter)
    # what went in and where it trained (the model card shows both), and the loss curve
    used = {"datasets": [p.used() for p in plan.parts], "device": device.type, "processes": processes}
    return {**used, **loss_curve(job_id, params, plan, ref)}


def loss_curve(job_id: uuid.UUID, params: PretrainParams, plan: TrainingPlan, ref: str) -> dict:
    """The job's loss-curve PNG (train loss per epoch, and the validation loss where records were held out)
    from its recorded epoch metrics, titled for the version ``ref``; its {figures, artifacts} result."""
    history: dict[int, dict[str, float]] = {}
    with session_scope() as s:
        for m in s.get(Job, job_id).metrics:
            if m.name in ("train_loss", "val_loss"):
                history.setdefault(m.epoch, {"epoch": m.epoch})[m.name] = m.value
    rows = [history[epoch] for epoch in sorted(history)]
    if not rows:
        return {}
    names = ", ".join(p.name for p in plan.parts)
    split = f"{names}: train {plan.train_segments} / val {plan.val_segments} segments"
    headline = f"final train loss {rows[-1]['train_loss']:.4f}"
    if "val_loss" in rows[-1]:
        headline += f", val loss {rows[-1]['val_loss']:.4f}"
    method = f"{params.method} pretraining ({params.model_size}, {len(rows)} epochs)"
    figures = Figures(artifacts_dir(job_id))
    figures.add(
        "loss_curve.png",
        "Loss per epoch",
        Caption(method, split, headline),
        lambda path, title: plot_history(rows, path, title),
    )
    return {"figures": figures.draw(ref), "artifacts": list_artifacts(job_id)}


def _plan(job_id: uuid.UUID, params: PretrainParams, reporter: JobReporter) -> TrainingPlan:
    """Open each dataset, build (or re-open) its preprocessed cache, hold out its validation records."""
    settings = get_settings()
    spec = input_spec(params)
    entries = params.entries
    reporter.phase("opening the dataset" if len(entries) == 1 else f"opening the {len(entries)} datasets")
    opened = []
    with session_scope() as s:
        job = s.get(Job, job_id)
        for k, entry in enumerate(entries):
            row = job.dataset if k == 0 and job.dataset is not None else dataset_for_job(s, entry.dataset)
            opened.append((row.name, row.kind, *open_registered(row)))
    # one generator for the hold-outs of all parts, in order: the first part's is a single dataset's
    rng = np.random.default_rng(params.seed)
    parts = []
    for k, (entry, (name, kind, dataset, identity)) in enumerate(zip(entries, opened, strict=True)):
        indices = np.arange(len(dataset))
        if entry.folds:
            if dataset.folds is None:
                raise ClientError(f"dataset '{entry.dataset}' has no folds, so 'folds' cannot select records")
            indices = indices[np.isin(dataset.folds, entry.folds)]
        indices = indices[: entry.record_limit]
        what = "records" if len(entries) == 1 else f"{name} ({k + 1}/{len(entries)})"
        cache = preprocessed(
            dataset,
            identity,
            spec,
            Path(settings.artifact_dir) / "cache",
            indices=indices,
            on_progress=lambda done, total, what=what: reporter.cancellable_phase(
                f"preprocessing {what}: {done}/{total}"
            ),
        )
        # hold out whole records (all their segments) for the per-epoch validation loss
        records = rng.permutation(len(cache.record_ids))
        n_val = int(round(len(records) * params.val_fraction)) if len(records) >= 10 else 0
        val_idx, train_idx = cache.segments_of(records[:n_val]), cache.segments_of(records[n_val:])
        parts.append(
            PlanPart(
                name=name,
                kind=kind,
                folds=entry.folds,
                record_limit=entry.record_limit,
                dataset=dataset,
                identity=identity,
                cache=cache,
                train_records=records[n_val:],
                train_idx=train_idx,
                val_idx=val_idx,
            )
        )
    job_dir = Path(settings.artifact_dir) / "jobs" / str(job_id)
    plan = TrainingPlan(spec, parts, job_dir)
    if plan.train_segments < 2:
        what = f"dataset '{params.dataset}'" if len(entries) == 1 else "the datasets"
        raise ClientError(f"{what} has {plan.train_segments} usable training segment(s); need >= 2")
    reporter.update(result={"datasets": [p.used() for p in parts]})  # what went in, shown while it trains
    return plan


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
    sources = f" of {len(plan.parts)} datasets" if len(plan.parts) > 1 else ""
    reporter.phase(
        f"training on {device.type}: {plan.train_segments} segments{sources}, {plan.val_segments} held out"
        f"{resuming}"
    )
    result = train(
        model,
        plan.train_set(params.seed),
        TrainConfig(
            epochs=params.epochs,
            batch_size=params.batch_size,
            learning_rate=params.learning_rate,
            weight_decay=params.weight_decay,
            warmup_epochs=params.warmup_epochs,
            seed=params.seed,
            checkpoint_every=params.checkpoint_every,
            amp=family(params.method).amp(device.type),
        ),
        device,
        checkpoint_path=plan.checkpoint,
        val_set=plan.val_set() if plan.val_segments else None,
        on_progress=reporter.progress,
        on_epoch=reporter.epoch_metrics,
        should_cancel=reporter.should_cancel,
        on_resume=reporter.resumed_from,
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
    code = run_torchrun("services.jobs.pretrain", [str(job_id)], processes, log_path, threads)
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
) -> str:
    """Publish the encoder (``services.registry.publish``: export, parity, variants), its registration
    atomic with a last cancel check (``register_unless_cancelled``). A hybrid model's clinical normaliser is
    fitted first. A job that had registered before its worker died keeps that version (its files are not
    written again). Returns the version's 'name@version'."""
    registered = reporter.registered_version()
    if registered is not None:
        reporter.phase(f"registered as {registered.ref} before the task was delivered again")
        return registered.ref
    normaliser, clinical_dim = None, 0
    if params.clinical_features:
        normaliser = _fit_clinical_normaliser(plan, reporter)
        clinical_dim = 2 * len(CLINICAL_FEATURES)
        reporter.check_cancel("after the clinical measurements")

    def register(s: Session, published: Published) -> ModelVersion:
        history = s.get(Job, job_id).metrics
        final = {m.name: m.value for m in history if m.epoch == params.epochs}
        return register_model_version(
            s,
            name=params.registry_name,
            method=params.method,
            source_job_id=job_id,
            **{**published.fields(), "embedding_dim": published.embedding_dim + clinical_dim},
            clinical_normaliser=normaliser,
            metrics={
                **final,
                "records": sum(len(p.cache.record_ids) for p in plan.parts),
                "train_segments": plan.train_segments,
                "skipped_records": sum(len(p.cache.meta["skipped"]) for p in plan.parts),
                "datasets": [p.used() for p in plan.parts],
                "resumed_from_epoch": resumed_from,
                "model_size": params.model_size,
            },
        )

    return publish(
        encoder,
        plan.check_windows(),  # real records, centre crops
        plan.job_dir / "encoder.onnx",
        plan.spec,
        lambda published: reporter.register_unless_cancelled(lambda s: register(s, published)),
        encoder=encoder,
        steps=reporter,
    )


def _fit_clinical_normaliser(plan: TrainingPlan, reporter: JobReporter) -> dict:
    """Clinical measurements of the job's training records (cached), and their normaliser fitted on them."""
    features = []
    for p in plan.parts:
        wanted = set(p.cache.record_ids[p.train_records].tolist())
        records = [i for i in range(len(p.dataset)) if p.dataset.record_id(i) in wanted]
        what = "" if len(plan.parts) == 1 else f" of {p.name}"
        features.append(
            clinical_features_for(
                p.dataset,
                records,
                cache_dir=Path(get_settings().artifact_dir) / "cache",
                identity=p.identity,
                on_progress=lambda done, total, what=what: reporter.cancellable_phase(
                    f"clinical measurements{what}: {done}/{total} records"
                ),
            )
        )
    return FeatureNormaliser.fit(np.concatenate(features)).to_dict()


def main(argv: list[str]) -> None:
    """One torchrun process of a job (``torch.distributed.run ... -m services.jobs.pretrain <job id>``).

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
