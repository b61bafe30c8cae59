"""The Celery app: `celery -A environment_provider.celery_app worker`.

Checkouts are long and must survive a worker that dies: tasks are
acknowledged late, rejected back to the queue when the worker is lost, and
prefetched one at a time. The Redis visibility timeout is longer than the
longest checkout so that a running task is not handed to a second worker.
"""

from __future__ import annotations

from celery import Celery

from .settings import Settings

SETTINGS = Settings.from_environment()

app = Celery("environment_provider", broker=SETTINGS.broker_url, backend=SETTINGS.result_backend, include=["environment_provider.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_track_started=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=SETTINGS.testrun_ttl,
    broker_transport_options={"visibility_timeout": int(SETTINGS.visibility_timeout or SETTINGS.total_timeout + 600)},
    result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Run by `environment-provider beat` (or a worker started with --beat).
    beat_schedule={
        "release-expiring-testruns": {"task": "EnvironmentProviderSweep", "schedule": SETTINGS.sweep_interval},
    },
)
