"""Fixtures for real services shared by every test directory.

- `redis_url`: redis://127.0.0.1:6379/N with N = 9 (+ the xdist worker index, up to 15),
  flushed once at the start of the session; skips (fails under CI=true) without Redis.
- `postgres_url`: a fresh database on 127.0.0.1:5432 for the session, dropped at the end;
  `postgres_database` is the same for a single test.
- `s3_server`: a SeaweedFS S3 server on loopback ports for the session (see tests/services.py);
  `s3_bucket` is a new empty bucket on it for one test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import (
    REDIS_URL,
    SeaweedFS,
    ServiceMissing,
    drop_postgres_database,
    flush_redis,
    make_postgres_database,
    postgres_ready,
    redis_ready,
    redis_test_db,
    require_service,
)


def _xdist_worker(request: pytest.FixtureRequest) -> str:
    return str(getattr(request.config, "workerinput", {}).get("workerid", ""))


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """A Redis database reserved for this test process, empty at the start of the session."""
    url = f"{REDIS_URL}/{redis_test_db(_xdist_worker(request))}"
    problem = redis_ready(url)
    if problem:
        require_service("Redis", problem)
    flush_redis(url)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database created for this session."""
    problem = postgres_ready()
    if problem:
        require_service("PostgreSQL", problem)
    url = make_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database created for one test, dropped after it."""
    problem = postgres_ready()
    if problem:
        require_service("PostgreSQL", problem)
    url = make_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 server for the session; its log is weed.log in its temp folder."""
    try:
        server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    except ServiceMissing as exc:
        require_service("SeaweedFS", str(exc))
        raise
    try:
        server.start()
    except ServiceMissing as exc:
        server.close()
        require_service("SeaweedFS", str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedFS) -> str:
    """A new, empty bucket on the session's S3 server."""
    return s3_server.make_bucket()
