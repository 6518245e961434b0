"""The embedded broker hands a message to a waiting consumer when it is put, not on a timer."""

from __future__ import annotations

import threading
import time

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from pipeline.celery_app import celery_config
from pipeline.inproc import TRANSPORT, Transport


def test_the_embedded_broker_is_the_woken_memory_transport() -> None:
    assert celery_config("memory://")["broker_transport"] == TRANSPORT
    assert celery_config("redis://127.0.0.1:6379/0")["broker_transport"] is None


def test_a_waiting_consumer_gets_a_message_when_it_is_put_not_after_its_backstop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a backstop of a minute, only the put's wake-up can deliver within the drain's
    10 s timeout; kombu's plain memory transport would sleep the whole interval."""
    monkeypatch.setattr(Transport, "polling_interval", 60.0)
    queue = Queue("inproc-test", Exchange("inproc-test"), routing_key="inproc-test")
    received: list[object] = []
    with Connection("memory://localhost/", transport=TRANSPORT) as connection:
        channel = connection.channel()
        queue(channel).declare()
        with Consumer(channel, [queue], callbacks=[lambda body, msg: received.append(body)]):
            sent = threading.Timer(
                0.2,
                lambda: Producer(connection.channel()).publish(
                    {"n": 1}, exchange=queue.exchange, routing_key="inproc-test"
                ),
            )
            started = time.monotonic()
            sent.start()
            connection.drain_events(timeout=10)
            waited = time.monotonic() - started
            sent.join()
    assert received == [{"n": 1}]
    assert waited < 10


def test_an_idle_drain_still_times_out() -> None:
    """Celery's loop relies on the timeout to check for shutdown between messages."""
    with Connection("memory://localhost/", transport=TRANSPORT) as connection:
        channel = connection.channel()
        queue = Queue("inproc-idle", Exchange("inproc-idle"), routing_key="inproc-idle")
        queue(channel).declare()
        with Consumer(channel, [queue], callbacks=[lambda body, msg: None]):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                connection.drain_events(timeout=0.3)
    assert time.monotonic() - started >= 0.3
