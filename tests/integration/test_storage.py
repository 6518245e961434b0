"""The same storage contract, run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import (
    ChecksumMismatch,
    ConfigError,
    PermanentError,
    ServiceUnavailable,
    StorageConflict,
    StorageTransientError,
)
from pipeline.storage import LocalStorage, S3Storage, Storage, open_storage
from tests.services import SeaweedFS, free_port, require_service

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
OTHER = b"\x89PNG\r\n\x1a\n" + bytes(reversed(range(256))) * 40
CDN = "https://cdn.example.test/assets/"
LINEAGE = {"item_key": "ik_123", "job_id": "job_abc", "seed": "42"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def failing_after(data: bytes, count: int) -> Iterator[bytes]:
    """A download that dies after `count` chunks."""
    for index, chunk in enumerate(chunked(data)):
        if index == count:
            raise ConnectionResetError("peer went away mid-download")
        yield chunk


def put(storage: Storage, key: str, data: bytes, **kwargs: Any) -> Any:
    return storage.put(key, chunked(data), content_type="image/png", metadata=LINEAGE, **kwargs)


def read_back(storage: Storage, key: str, server: SeaweedFS | None) -> bytes:
    """The stored bytes, read around the interface the way a user would."""
    if isinstance(storage, LocalStorage):
        return (storage.root / key).read_bytes()
    assert isinstance(storage, S3Storage) and server is not None
    full_key = f"{storage.prefix}/{key}" if storage.prefix else key
    return bytes(server.client().get_object(Bucket=storage.bucket, Key=full_key)["Body"].read())


@pytest.fixture(scope="module")
def shared_bucket(s3_server: SeaweedFS) -> str:
    return s3_server.make_bucket()


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, SeaweedFS | None]:
    """A fresh storage: a temp folder, or a unique prefix in a bucket on SeaweedFS."""
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'out'}", public_base_url=CDN), None
    server: SeaweedFS = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("shared_bucket")
    url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    return open_storage(url, public_base_url=CDN, **server.storage_options()), server


@pytest.fixture
def storage(backend: tuple[Storage, SeaweedFS | None]) -> Storage:
    return backend[0]


def test_round_trip_records_sha256_size_uri_and_public_url(storage: Storage) -> None:
    storage.check()
    key = "forest-icons/iron-sword/0.png"

    stored = put(storage, key, PNG)

    assert (stored.key, stored.sha256, stored.size) == (key, sha(PNG), len(PNG))
    assert stored.public_url == "https://cdn.example.test/assets/forest-icons/iron-sword/0.png"
    assert stored.uri.endswith("/forest-icons/iron-sword/0.png")
    assert storage.key_from_uri(stored.uri) == key
    assert storage.head(key) == stored
    assert storage.verify(key, sha(PNG))
    assert not storage.verify(key, sha(OTHER))
    assert list(storage.iter_keys()) == [key]


def test_stored_bytes_are_exactly_the_streamed_bytes(
    backend: tuple[Storage, SeaweedFS | None],
) -> None:
    storage, server = backend
    put(storage, "a/0.png", PNG)
    assert read_back(storage, "a/0.png", server) == PNG


def test_repeating_a_put_with_the_same_bytes_is_a_no_op(storage: Storage) -> None:
    first = put(storage, "a/0.png", PNG)
    again = put(storage, "a/0.png", PNG, expected_sha256=sha(PNG))
    assert again == first
    assert list(storage.iter_keys()) == ["a/0.png"]


def test_different_bytes_at_an_existing_key_conflict_and_leave_the_original(
    backend: tuple[Storage, SeaweedFS | None],
) -> None:
    storage, server = backend
    put(storage, "a/0.png", PNG)

    with pytest.raises(StorageConflict, match="different bytes"):
        put(storage, "a/0.png", OTHER)

    assert read_back(storage, "a/0.png", server) == PNG
    assert storage.verify("a/0.png", sha(PNG))


def test_a_replacing_put_writes_new_bytes_and_keeps_identical_ones(
    backend: tuple[Storage, SeaweedFS | None],
) -> None:
    storage, server = backend
    first = put(storage, "a/0.png", PNG, replace=True)
    assert put(storage, "a/0.png", PNG, replace=True) == first
    assert put(storage, "a/0.png", OTHER, replace=True).sha256 == sha(OTHER)
    assert read_back(storage, "a/0.png", server) == OTHER


def test_an_s3_put_of_a_new_key_is_one_request(s3_server: SeaweedFS, s3_bucket: str) -> None:
    """No HeadObject before writing a fresh key: the conditional write says if it is taken."""
    storage = open_storage(f"s3://{s3_bucket}/one", **s3_server.storage_options())
    assert isinstance(storage, S3Storage)
    calls: list[str] = []
    storage._client().meta.events.register(
        "before-call.s3", lambda model, **_: calls.append(model.name)
    )
    put(storage, "a/0.png", PNG, replace=True)
    assert calls == ["PutObject"]
    put(storage, "a/0.png", PNG, replace=True)  # taken: it looks, finds the same bytes
    assert calls == ["PutObject", "PutObject", "HeadObject"]


def test_racing_writers_of_different_bytes_leave_exactly_one_winner(
    backend: tuple[Storage, SeaweedFS | None],
) -> None:
    storage, server = backend
    bodies = [bytes([index]) * 5000 for index in range(6)]
    barrier = threading.Barrier(len(bodies))
    outcomes: list[object] = [None] * len(bodies)

    def write(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = put(storage, "race.png", bodies[index])
        except StorageConflict as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=write, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, StorageConflict)]
    assert len(winners) == 1
    assert read_back(storage, "race.png", server) == bodies[winners[0]]
    assert storage.verify("race.png", sha(bodies[winners[0]]))


def test_checksum_mismatch_stores_nothing(storage: Storage) -> None:
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        put(storage, "a/0.png", PNG, expected_sha256=sha(OTHER))
    assert storage.head("a/0.png") is None
    assert list(storage.iter_keys()) == []


def test_a_download_failing_midway_leaves_no_object_and_no_leftovers(storage: Storage) -> None:
    with pytest.raises(ConnectionResetError):
        storage.put("a/0.png", failing_after(PNG, 3), content_type="image/png", metadata={})

    assert storage.head("a/0.png") is None
    assert list(storage.iter_keys()) == []
    if isinstance(storage, LocalStorage):
        leftovers = [p for p in storage.root.rglob("*") if p.is_file()]
        assert leftovers == []


def test_keys_are_listed_sorted_by_prefix_and_can_be_deleted(storage: Storage) -> None:
    for key in ["b/1.png", "a/2.png", "a/1.png", "ab.png"]:
        put(storage, key, key.encode())

    assert list(storage.iter_keys()) == ["a/1.png", "a/2.png", "ab.png", "b/1.png"]
    assert list(storage.iter_keys("a/")) == ["a/1.png", "a/2.png"]
    assert list(storage.iter_keys("a")) == ["a/1.png", "a/2.png", "ab.png"]
    assert list(storage.iter_keys("../")) == []

    storage.delete("a/1.png")
    storage.delete("a/1.png")  # deleting twice is fine
    assert storage.head("a/1.png") is None
    assert list(storage.iter_keys("a/")) == ["a/2.png"]
    # After a delete the key is free again, even for different bytes.
    assert put(storage, "a/1.png", OTHER).sha256 == sha(OTHER)


def test_an_empty_body_is_a_valid_object(storage: Storage) -> None:
    stored = storage.put("empty.txt", iter([]), content_type="text/plain", metadata={})
    assert (stored.size, stored.sha256) == (0, sha(b""))
    assert storage.verify("empty.txt", sha(b""))


@pytest.mark.parametrize(
    "key",
    ["/etc/passwd", "a/../b.png", "../b.png", "a\\b.png", "a//b.png", "", "a/", ".", ".meta/x"],
)
def test_unsafe_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(PermanentError, match="invalid storage key"):
        put(storage, key, PNG)
    assert list(storage.iter_keys()) == []


def test_key_from_uri_rejects_other_locations(storage: Storage) -> None:
    assert storage.key_from_uri("s3://someone-else/a/0.png") is None
    assert storage.key_from_uri("file:///somewhere/else/a/0.png") is None
    assert storage.key_from_uri("https://cdn.example.test/a/0.png") is None
    assert storage.key_from_uri(storage.uri_for("a b/ü.png")) == "a b/ü.png"


def test_s3_objects_carry_content_type_cache_control_checksum_and_lineage(
    s3_server: SeaweedFS, s3_bucket: str
) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", **s3_server.storage_options())
    metadata = {**LINEAGE, "Prompt": "épée de fer, icône " + "x" * 3000, "Bad Key!": "v\n2"}
    storage.put("a/0.png", chunked(PNG), content_type="image/png", metadata=metadata)

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="p/a/0.png", ChecksumMode="ENABLED")

    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "public, max-age=86400"
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(PNG).digest()).decode()
    meta = head["Metadata"]
    assert meta["sha256"] == sha(PNG)
    assert {k: meta[k] for k in LINEAGE} == LINEAGE
    assert meta["prompt"].startswith("%C3%A9p%C3%A9e de fer") and meta["prompt"].endswith("...")
    assert meta["bad-key"] == "v%0A2"
    assert sum(len(k) + len(v) for k, v in meta.items()) < 2048


def test_a_local_key_that_names_a_folder_conflicts(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    put(storage, "a/0.png", PNG)
    with pytest.raises(StorageConflict, match="collides with an existing path"):
        put(storage, "a", PNG)
    with pytest.raises(StorageConflict, match="collides with an existing path"):
        put(storage, "a/0.png/x", PNG)
    assert list(storage.iter_keys()) == ["a/0.png"]


def test_local_metadata_lives_in_a_hidden_sidecar(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    storage.put("a/0.png", chunked(PNG), content_type="image/png", metadata=LINEAGE)

    assert isinstance(storage, LocalStorage)
    assert storage.read_metadata("a/0.png") == LINEAGE
    assert sorted(p.name for p in tmp_path.iterdir()) == [".meta", ".staging", "a"]
    # A lost sidecar (crash after the link) is recomputed from the bytes, not trusted blindly.
    (tmp_path / ".meta" / "a" / "0.png.json").unlink()
    assert storage.verify("a/0.png", sha(PNG))


def test_open_storage_resolves_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_storage("file://./assets")
    assert isinstance(relative, LocalStorage) and relative.root == tmp_path / "assets"
    assert relative.url == "file://./assets"
    s3 = open_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("k.png") == "s3://bucket/some/prefix/k.png"
    with pytest.raises(ConfigError, match="unsupported storage URL"):
        open_storage("gs://bucket")
    with pytest.raises(ConfigError, match="must not contain credentials") as caught:
        open_storage("s3://AKIAXXXX:hunter2@bucket")
    assert "hunter2" not in str(caught.value)


def test_check_on_a_missing_bucket_is_one_clear_line_without_credentials(
    s3_server: SeaweedFS,
) -> None:
    storage = open_storage("s3://no-such-bucket-here", **s3_server.storage_options())
    with pytest.raises(ServiceUnavailable) as caught:
        storage.check()
    message = str(caught.value)
    assert message == f"S3 bucket 'no-such-bucket-here' does not exist at {s3_server.endpoint_url}"
    assert s3_server.secret_key not in message and s3_server.access_key not in message


def test_check_with_wrong_credentials_names_the_problem(
    s3_server: SeaweedFS, s3_bucket: str
) -> None:
    options = {**s3_server.storage_options(), "aws_secret_access_key": "wrong-secret-value"}
    storage = open_storage(f"s3://{s3_bucket}", **options)
    with pytest.raises(ServiceUnavailable, match="refused access") as caught:
        storage.check()
    assert "wrong-secret-value" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_on_an_unreachable_endpoint_is_service_unavailable() -> None:
    storage = S3Storage(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret-never-shown",
        region_name="us-east-1",
        max_attempts=1,
    )
    with pytest.raises(ServiceUnavailable, match="cannot connect") as caught:
        storage.check()
    assert "secret-never-shown" not in str(caught.value)


def test_check_on_an_unwritable_folder_is_service_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ServiceUnavailable, match="not writable"):
        open_storage(f"file://{blocker}/assets").check()


def test_an_s3_outage_is_transient_and_storage_recovers(
    s3_server: SeaweedFS, s3_bucket: str
) -> None:
    # One attempt per call keeps the outage short; botocore's own retries are not under test.
    storage = S3Storage(s3_bucket, max_attempts=1, **s3_server.storage_options())
    put(storage, "before.png", PNG)

    s3_server.stop()
    try:
        with pytest.raises(StorageTransientError, match="cannot connect"):
            put(storage, "during.png", PNG)
        with pytest.raises(StorageTransientError):
            storage.head("before.png")
    finally:
        s3_server.start()

    assert storage.verify("before.png", sha(PNG))
    assert put(storage, "during.png", PNG).sha256 == sha(PNG)


def test_the_client_is_rebuilt_in_a_forked_child(s3_server: SeaweedFS, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}", **s3_server.storage_options())
    assert isinstance(storage, S3Storage)
    put(storage, "parent.png", PNG)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            storage.put("child.png", chunked(OTHER), content_type="image/png", metadata={})
            # The child must have built its own client rather than reuse the parent's.
            code = 0 if storage._client_pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage.verify("child.png", sha(OTHER))
    assert storage.verify("parent.png", sha(PNG))


def test_a_missing_service_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="S3 not available: down"):
        require_service("S3", "down")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required because CI=true"):
        require_service("S3", "down")
