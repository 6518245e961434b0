"""The Celery application: configuration only; the tasks live in `pipeline.tasks`.

Settings follow design.md: late acks with reject-on-worker-lost (a task a dead worker held
is redelivered, and redelivery is harmless because every task claims its item in SQL
first), prefetch 1, no result backend (state lives in SQL), and a short visibility timeout
so a message of a SIGKILLed worker comes back in minutes, not an hour. Nothing here
connects at import time.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

QUEUE = "pipeline"

app = Celery("pipeline", include=["pipeline.tasks"])


def celery_config(broker_url: str) -> dict[str, Any]:
    """The Celery settings for a broker URL (memory:// embedded, redis:// distributed)."""
    memory = broker_url.startswith("memory://")
    return {
        # kombu warns about a memory:// URL without a host; the host means nothing there.
        "broker_url": "memory://localhost/" if memory else broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": (
            {"polling_interval": 0.01}
            if memory
            else {"visibility_timeout": 300, "socket_timeout": 5, "socket_connect_timeout": 5}
        ),
        "broker_pool_limit": 4,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": 600,
        "task_time_limit": 660,
        "enable_utc": True,
    }


def configure(broker_url: str) -> Celery:
    """Point the application at a broker."""
    app.conf.update(celery_config(broker_url))
    return app
