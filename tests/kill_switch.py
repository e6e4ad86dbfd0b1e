"""The Celery app of a worker that dies at one chosen point of a pretraining job, for the drills of
test_e2e.py: ``celery -A tests.kill_switch worker ...`` with ``KILL_AT`` set.

Dying is SIGKILL to the worker's whole process group (its main process and its pool child, as ``kill -9``
of a worker or the loss of its machine): nothing is cleaned up, acknowledged or recorded.

KILL_AT:
- ``epoch:N``: once the metrics of epoch N are written (between checkpoints when N is not one);
- ``checkpoint:N``: while the checkpoint of epoch N is written (its temporary file complete, not renamed);
- ``export``: once the encoder is exported to ONNX and checked, before its variants and registration;
- ``registered``: once the version is registered, before the job's outcome is written.
"""

import os
import signal

import torch

import services.registry.publish
from services.jobs.runner import JobReporter
from worker.celery_app import celery_app

__all__ = ["celery_app"]


def die() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _arm(kill_at: str) -> None:
    where, _, number = kill_at.partition(":")
    if where == "epoch":
        write_metrics = JobReporter.epoch_metrics

        def epoch_metrics(self: JobReporter, epoch: int, metrics: dict, prefix: str = "") -> None:
            write_metrics(self, epoch, metrics, prefix)
            if epoch == int(number):
                die()

        JobReporter.epoch_metrics = epoch_metrics
    elif where == "checkpoint":
        save = torch.save

        def save_then_die(obj: object, f: object, *args: object, **kwargs: object) -> None:
            save(obj, f, *args, **kwargs)
            if str(f).endswith(".tmp") and isinstance(obj, dict) and obj.get("epoch") == int(number):
                die()

        torch.save = save_then_die
    elif where == "export":
        export_checked = services.registry.publish.export_checked

        def export_then_die(*args: object, **kwargs: object) -> float:
            export_checked(*args, **kwargs)
            die()

        services.registry.publish.export_checked = export_then_die
    elif where == "registered":
        update = JobReporter.update

        def update_unless_outcome(self: JobReporter, **fields: object) -> None:
            if "status" in fields:  # the outcome: the version is registered by now
                die()
            update(self, **fields)

        JobReporter.update = update_unless_outcome
    else:
        raise ValueError(f"KILL_AT={kill_at!r}: expected epoch:N, checkpoint:N, export or registered")


_arm(os.environ["KILL_AT"])
