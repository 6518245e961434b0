"""Per-process wiring: settings in, a `Context` out; the embedded worker; the dispatcher.

Clients (httpx, boto3, SQLAlchemy engine) are built lazily, once per process, and rebuilt
after a fork: nothing connects at import time and nothing is shared across processes.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kombu.exceptions import KombuError, OperationalError
from sqlalchemy import Engine

from pipeline import db
from pipeline.capacity import CapacityStore
from pipeline.celery_app import app, configure
from pipeline.errors import ConfigError
from pipeline.governor import make_governor
from pipeline.repository import Repository
from pipeline.scenario import ScenarioClient
from pipeline.settings import Settings, load_settings
from pipeline.stages import Context, SweeperState, Tuning
from pipeline.storage import open_storage

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_settings: Settings | None = None
_tuning: Tuning | None = None
_context: tuple[int, Context] | None = None
_sweeper_state: SweeperState | None = None


def tuning_from(settings: Settings) -> Tuning:
    """Timing knobs from settings."""
    return Tuning(
        parallel_jobs=settings.parallel_jobs,
        lease_seconds=settings.lease_seconds,
        list_interval=settings.poll_interval,
        tick=settings.sweep_tick,
    )


def configure_runtime(settings: Settings, tuning: Tuning | None = None) -> None:
    """Set the settings this process builds its context from, and point Celery at the broker."""
    global _settings, _tuning, _context, _sweeper_state
    with _lock:
        _settings = settings
        _tuning = tuning or tuning_from(settings)
        _context = None
        _sweeper_state = None
    configure(settings.broker_url)


def settings() -> Settings:
    """This process's settings (read from the environment on first use in a worker)."""
    global _settings
    if _settings is None:
        configure_runtime(load_settings())
    assert _settings is not None
    return _settings


def credentials(s: Settings) -> tuple[str, str]:
    """The API key and secret, or a ConfigError naming the variables to set."""
    key = s.api_key.get_secret_value() if s.api_key else ""
    secret = s.api_secret.get_secret_value() if s.api_secret else ""
    if not key or not secret:
        raise ConfigError(
            "Scenario credentials are not set: export SCENARIO_API_KEY and SCENARIO_API_SECRET "
            "(or use --sandbox for the local sandbox)"
        )
    return key, secret


def build_context(s: Settings, tuning: Tuning, engine: Engine | None = None) -> Context:
    """A fresh Context for this process: engine, Scenario client, storage, dispatcher."""
    key, secret = credentials(s)
    governor = make_governor(s.redis_url, s.requests_per_second, max(1, int(s.requests_per_second)))
    client = ScenarioClient(s.api_url, key, secret, timeout=s.http_timeout, governor=governor)
    storage = open_storage(
        s.storage_url, public_base_url=s.public_base_url, endpoint_url=s.s3_endpoint_url
    )
    repo = Repository(engine or db.make_engine(s.database_url, threads=s.worker_concurrency + 2))
    return Context(
        repo=repo,
        client=client,
        storage=storage,
        dispatch=CeleryDispatcher(),
        tuning=tuning,
        capacity=CapacityStore(repo, urlsplit(s.api_url).netloc, key),
    )


def context() -> Context:
    """This process's Context, built on first use (and again after a fork)."""
    global _context
    with _lock:
        if _context is not None and _context[0] == os.getpid():
            return _context[1]
    s = settings()
    assert _tuning is not None
    ctx = build_context(s, _tuning)
    with _lock:
        _context = (os.getpid(), ctx)
    return ctx


def set_context(ctx: Context) -> None:
    """Use a ready-made Context in this process (embedded runs, tests)."""
    global _context
    with _lock:
        _context = (os.getpid(), ctx)


def sweeper_state() -> SweeperState:
    global _sweeper_state
    if _sweeper_state is None:
        _sweeper_state = SweeperState(api_host=urlsplit(settings().api_url).netloc)
    return _sweeper_state


class CeleryDispatcher:
    """Sends task messages. A lost message is harmless: the item's lease expires and the
    sweeper sends it again, so broker trouble is logged, not raised."""

    def submit(self, node_ids: Sequence[int]) -> None:
        self._send("pipeline.submit", [list(node_ids), time.time()])

    def collect(self, node_ids: Sequence[int]) -> None:
        self._send("pipeline.collect", [list(node_ids)])

    def warm(self) -> None:
        """A message that does nothing, to set the queue up before work needs it."""
        self._send("pipeline.warm", [])

    def _send(self, name: str, args: list[Any]) -> None:
        try:
            app.send_task(name, args=args, retry=False)
        except (KombuError, OperationalError, OSError) as exc:
            logger.warning("could not enqueue %s%s (broker down?): %s", name, args, exc)


_settled = False


def settle_heap() -> None:
    """Take what a set-up process holds for good out of the garbage collector's view.

    The modules, the Celery app, the clients and the run's manifest live until the process
    exits, yet every full collection walks them all: with the embedded worker loaded that
    stalls every thread for 50-90 ms, a few times a run, and a wave of submissions or a
    collect waits it out. Frozen (`gc.freeze`), they are skipped; what is allocated later
    is collected as before. Once per process, when it is ready to work.
    """
    global _settled
    if not _settled:
        _settled = True
        gc.freeze()


class EmbeddedWorker:
    """A Celery worker running in this process on threads (the embedded default)."""

    def __init__(self, concurrency: int = 4) -> None:
        from celery.worker import WorkController

        self._started = threading.Event()
        started = self._started

        class _Controller(WorkController):
            def on_consumer_ready(self, consumer: Any) -> None:
                started.set()

        self.controller = _Controller(
            app=app,
            pool="threads",
            concurrency=concurrency,
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            queues=["pipeline"],
        )
        self._thread = threading.Thread(
            target=self.controller.start, name="pipeline-embedded-worker", daemon=True
        )

    def start(self, timeout: float = 30.0) -> EmbeddedWorker:
        return self.launch().ready(timeout)

    def launch(self) -> EmbeddedWorker:
        """Start the worker's thread; it gets ready while the caller does other things."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def ready(self, timeout: float = 30.0) -> EmbeddedWorker:
        """Wait until the worker consumes its queue."""
        if not self._started.wait(timeout):
            raise RuntimeError("the embedded worker did not start")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.controller.stop(in_sighandler=False)
        self._thread.join(timeout)


def check_broker(broker_url: str) -> None:
    """Raise ServiceUnavailable with one line if a Redis broker cannot be reached."""
    from pipeline.errors import ServiceUnavailable

    if broker_url.startswith("memory://"):
        return
    try:
        with app.connection_for_write(broker_url) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # kombu raises many kinds; all mean the same thing here
        safe = urlsplit(broker_url)
        where = f"{safe.scheme}://{safe.hostname}:{safe.port or ''}"
        raise ServiceUnavailable(f"cannot reach the broker {where}: {exc}") from None
