"""The Celery application: configuration only; the tasks live in `pipeline.tasks`.

Settings follow design.md: late acks with reject-on-worker-lost (a task a dead worker held
is redelivered, and redelivery is harmless because every task claims its item in SQL
first), prefetch 1, no result backend (state lives in SQL), and a short visibility timeout
so a message of a SIGKILLed worker comes back in minutes, not an hour. Nothing here
connects at import time.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready

logger = logging.getLogger(__name__)

QUEUE = "pipeline"

app = Celery("pipeline", include=["pipeline.tasks"])


def celery_config(broker_url: str) -> dict[str, Any]:
    """The Celery settings for a broker URL (memory:// embedded, redis:// distributed)."""
    memory = broker_url.startswith("memory://")
    return {
        # kombu warns about a memory:// URL without a host; the host means nothing there.
        "broker_url": "memory://localhost/" if memory else broker_url,
        # In-process messages wake the worker at once (see pipeline.inproc).
        "broker_transport": "pipeline.inproc:Transport" if memory else None,
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
            {}
            if memory
            else {"visibility_timeout": 300, "socket_timeout": 5, "socket_connect_timeout": 5}
        ),
        "broker_pool_limit": 4,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": 600,
        "task_time_limit": 660,
        "enable_utc": True,
    }


@app.on_configure.connect
def _settings_from_environment(sender: Celery, **_: Any) -> None:
    """`celery -A pipeline.celery_app worker` reads PIPELINE_BROKER_URL, as `pipeline worker`
    does (pending defaults: an explicit `configure()` still wins)."""
    from pipeline.schedule import beat_schedule
    from pipeline.settings import Settings

    settings = Settings()
    sender.add_defaults(celery_config(settings.broker_url))
    # `celery -A pipeline.celery_app beat` runs PIPELINE_SCHEDULE (see pipeline/schedule.py).
    sender.add_defaults({"beat_schedule": beat_schedule(settings)})
    _tolerate_lost_unacked_restore()


@worker_ready.connect
def _settle_heap(**_: Any) -> None:
    """A worker ready to work keeps what it holds now until it exits (see settle_heap)."""
    from pipeline.runtime import settle_heap

    settle_heap()


def configure(broker_url: str) -> Celery:
    """Point the application at a broker."""
    app.conf.update(celery_config(broker_url))
    _tolerate_lost_unacked_restore()
    return app


def _tolerate_lost_unacked_restore() -> None:
    """Keep a worker alive when Redis goes away while it holds unacknowledged messages.

    With late acks and the threads pool, kombu (5.7) closes the channel on connection loss
    and then (a) tries to push the unacked messages back and (b) acks messages whose tasks
    finish afterwards, both on the torn-down connection. Both raise AttributeError
    ('NoneType' object has no attribute 'hostname' / 'client'), which Celery treats as an
    unrecoverable error: the worker exits. Losing those acks and restores is harmless here:
    messages carry only ids, a redelivered one finds its item claimed or finished, and the
    sweeper re-dispatches anything whose lease expires. So they are logged, not fatal.
    """
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos, "_pipeline_tolerant", False):
        return
    lost = (AttributeError, OSError, kombu_redis.redis.exceptions.RedisError)
    restore, ack, reject = qos.restore_unacked, qos.ack, qos.reject

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return restore(self, client)
        except lost as exc:
            logger.warning(
                "could not hand %d unacknowledged message(s) back to the broker (%s); "
                "the sweeper re-dispatches their items from SQL",
                len(self._delivered),
                exc,
            )
            self._delivered.clear()
            return None

    def _forget(self: Any, delivery_tag: Any, exc: BaseException) -> None:
        logger.warning("ack of a message from a lost broker connection dropped (%s)", exc)
        self._delivered.pop(delivery_tag, None)

    def tolerant_ack(self: Any, delivery_tag: Any) -> None:
        try:
            ack(self, delivery_tag)
        except lost as exc:
            _forget(self, delivery_tag, exc)

    def tolerant_reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            reject(self, delivery_tag, requeue)
        except lost as exc:
            _forget(self, delivery_tag, exc)

    for name, patched in (
        ("restore_unacked", restore_unacked),
        ("ack", tolerant_ack),
        ("reject", tolerant_reject),
        ("_pipeline_tolerant", True),
    ):
        setattr(qos, name, patched)
