"""The embedded broker: kombu's in-memory transport, woken by its messages.

kombu's `memory://` transport has no way to block on its queues: a consumer finding them
empty sleeps `polling_interval` and looks again. Every task the sweeper hands out then
waits half that interval on average before a worker thread starts it (2.5 ms at 5 ms, on
each refill of a freed slot and each collect), and an idle run wakes 200 times a second.

Here a message put on any queue sets one event that the waiting consumer sleeps on, so a
task starts within microseconds, and the interval is only a backstop. Messages never leave
the process, as with `memory://`; Celery selects this class through `broker_transport`.
"""

from __future__ import annotations

import threading
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import memory

TRANSPORT = "pipeline.inproc:Transport"
BACKSTOP = 0.25  # seconds a consumer waits between looks if a wake-up were ever missed

_arrived = threading.Event()  # a message was put since the consumer last cleared it


class Channel(memory.Channel):
    """The memory channel; every put wakes the consumers."""

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)
        _arrived.set()

    def _put_fanout(self, exchange: str, message: Any, routing_key: Any = None, **kw: Any) -> None:
        super()._put_fanout(exchange, message, routing_key, **kw)
        _arrived.set()


class Transport(memory.Transport):
    """The memory transport; an empty look waits for the next put, not a fixed sleep."""

    Channel = Channel
    polling_interval = BACKSTOP

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        cycle = self.cycle
        assert cycle is not None  # set up with the transport's first channel
        started = monotonic()
        while True:
            # Cleared before looking: a put that lands after an empty look sets it again,
            # so the wait below returns at once instead of missing that message.
            _arrived.clear()
            try:
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                waited = monotonic() - started
                if timeout is not None and waited >= timeout:
                    raise TimeoutError() from None  # socket.timeout, as kombu raises
                wait = self.polling_interval or BACKSTOP
                if timeout is not None:
                    wait = min(wait, timeout - waited)
                _arrived.wait(wait)
