"""The product's Celery app with a short Redis visibility timeout, for the duplicate delivery trials.

The product derives the visibility timeout from the total timeout
(`ENVIRONMENT_PROVIDER_TOTAL_TIMEOUT` + 600 s), so it cannot be shorter than
600 s. This module sets it from `FAULTS_VISIBILITY_TIMEOUT` instead, and
makes kombu look for overdue messages every second rather than every
100 s (kombu 5.7 defaults: `unacked_restore_interval` 10 s times
`unacked_restore_throttle` 10).

    celery -A short_visibility worker    # with faults/ on PYTHONPATH
"""

from __future__ import annotations

import os

from environment_provider.celery_app import app

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": float(os.environ.get("FAULTS_VISIBILITY_TIMEOUT", "10")),
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
