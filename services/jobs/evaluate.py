"""Evaluation jobs (``POST /jobs/evaluate``): how good are a registered version's embeddings for diagnosis?

The embeddings are those the service serves: the version's fp32 ONNX graph (``embedding`` output) on each
record's cached 10-s segments, averaged over ST-MEM's 3 test-time crops and over the record's segments;
for a hybrid version followed by its normalised clinical measurements and missing flags, as ``/embed``.
Protocols, all fitted on the train split, tuned on val and read on test:

- ``knn``: k nearest training records (cosine by default) vote per class; thresholds tuned on val; with
  ``store_reference`` the training embeddings and labels become the version's kNN reference set;
- ``linear_probe``: a linear head (BCE per class) on the frozen embeddings, through the one training loop
  (per epoch: train_loss, val_loss, val_macro_auroc), thresholds tuned on val;
- ``clustering``: cluster indices and k-means ARI/NMI of the test embeddings, and their 2-D map.
"""

import uuid

import numpy as np
import torch

from services.config import get_settings
from services.datasets.registry import dataset_for_job
from services.db.models import Job, ModelVersion
from services.db.session import session_scope
from services.evaluation.metrics import classification_result
from services.evaluation.plots import Figures
from services.inference.sessions import SESSIONS, ServedModel
from services.jobs.downstream import (
    DOWNSTREAM_BETAS,
    classification_plots,
    clustering_protocol,
    fit_linear_head,
    head_scores,
    history_plot,
    knn_protocol,
    save_reference,
    scores_auroc,
)
from services.jobs.labelled import open_labelled, record_features, split_labels
from services.jobs.params import EvaluateParams
from services.jobs.runner import JobReporter, run_job
from services.jobs.store import artifacts_dir, job_dir, list_artifacts
from services.registry import resolve_model_version
from services.training.loop import TrainConfig, pick_device


def run_evaluate_job(job_id: uuid.UUID, worker: str) -> str:
    """Run one evaluation job to its end and record the outcome (``services.jobs.runner.run_job``)."""
    return run_job(
        job_id, worker, lambda raw, reporter: evaluate(job_id, EvaluateParams.model_validate(raw), reporter)
    )


def evaluate(job_id: uuid.UUID, params: EvaluateParams, reporter: JobReporter) -> dict:
    reporter.phase("opening the model version and the dataset")
    with session_scope() as s:
        job = s.get(Job, job_id)
        served = ServedModel.from_version(resolve_model_version(s, params.model))
        row = job.dataset if job.dataset is not None else dataset_for_job(s, params.dataset)
    data = open_labelled(row, served.spec, params.record_limit, reporter, params.test_fold)
    figures = Figures(artifacts_dir(job_id))
    reporter.phase(f"embedding {sum(data.counts().values())} records with {served.ref} (fp32 ONNX, 3 crops)")
    # uncached: a worker must not keep the session (GPU memory) after the job; one the API holds is reused
    with SESSIONS.lease(served, "fp32", strict=True, cache=False) as loaded:
        embeddings = record_features(data, lambda w: loaded.infer(w)[0], data.spec.samples)
    if served.clinical_normaliser is not None:
        clinical = data.clinical(served.clinical_normaliser, reporter)
        embeddings = {split: np.concatenate([x, clinical[split]], axis=1) for split, x in embeddings.items()}
    reporter.check_cancel("after embedding the records")
    labels, names = split_labels(data), data.class_names
    result: dict = {
        "model_version": served.ref,
        "dataset": data.name,
        "records": data.counts(),
        "class_names": list(names),
        "embedding_dim": int(embeddings["train"].shape[1]),
        "embedding": "fp32 ONNX 'embedding' output, mean over 3 crops and over the record's 10-s segments"
        + (", then the clinical measurements and missing flags" if served.clinical_normaliser else ""),
        "protocols": list(params.protocols),
    }

    if "knn" in params.protocols:
        reporter.phase("kNN")
        result["knn"], _ = knn_protocol(embeddings, labels, names, params.knn_k, params.knn_metric, figures)
        if params.store_reference:
            reference = save_reference(
                job_dir(job_id) / "knn_reference.npz", embeddings["train"], labels["train"],
                data.cache.record_ids[data.records["train"]], names, result["knn"], data.name, job_id,
            )  # fmt: skip
            with session_scope() as s:
                s.get(ModelVersion, served.version_id).knn_reference = reference
            result["knn_reference_stored"] = True

    if "linear_probe" in params.protocols:
        reporter.phase("linear probe")
        cfg = TrainConfig(
            epochs=params.probe_epochs,
            batch_size=64,
            learning_rate=params.probe_learning_rate,
            weight_decay=params.probe_weight_decay,
            betas=DOWNSTREAM_BETAS,
            warmup_epochs=min(5.0, params.probe_epochs / 10),
            seed=params.seed,
            checkpoint_every=params.probe_epochs,
        )
        device = pick_device(get_settings().device)
        torch.manual_seed(params.seed)  # the head's initialisation follows from the job's seed
        head, history = fit_linear_head(
            embeddings, labels, cfg, device, job_dir(job_id) / "probe_checkpoint.pt", reporter
        )
        scores = {split: head_scores(head, embeddings[split]) for split in ("val", "test")}
        probe = classification_result(
            "linear_probe", labels["val"], scores["val"], labels["test"], scores["test"], names,
            {"epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        )  # fmt: skip
        result["linear_probe"] = {
            **probe.to_dict(),
            "val_macro_auroc": scores_auroc(labels["val"], scores["val"]),
        }
        method = "linear probe (frozen embeddings)"
        classification_plots("linear_probe", method, probe, labels["test"], scores["test"], figures)
        history_plot(history, figures, "history_linear_probe.png", method, data.counts())

    if "clustering" in params.protocols:
        reporter.phase("clustering")
        result["clustering"], _ = clustering_protocol(
            embeddings["test"], labels["test"], names, figures, params.seed, params.map_method, "clustering"
        )
    result["figures"] = figures.draw(served.ref)
    result["artifacts"] = list_artifacts(job_id)
    return result
