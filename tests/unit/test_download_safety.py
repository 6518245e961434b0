"""Downloads are safe (size, type, redirects, no credentials off the API host) and large
inputs go through Scenario's multipart /uploads flow. Against httpx.MockTransport."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from pipeline.errors import DownloadIncomplete, PermanentError, PipelineError
from pipeline.limits import DIRECT_UPLOAD_MAX_BYTES, MAX_REDIRECTS, UPLOAD_PART_BYTES
from pipeline.retry import Backoff
from pipeline.scenario import ScenarioClient, image_type

BASE = "https://api.example.test/v1"
CDN = "https://cdn.example.test"
KEY, SECRET = "key_abc", "secret-DO-NOT-LEAK-7731"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 200
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 200
GIF = b"GIF89a" + b"\x00" * 200

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def client_for(handler: Handler) -> tuple[ScenarioClient, Recorder, list[float]]:
    recorder = Recorder(handler)
    slept: list[float] = []
    client = ScenarioClient(
        BASE,
        KEY,
        SECRET,
        transport=httpx.MockTransport(recorder),
        read_retry=Backoff(max_attempts=3, initial=0.01, maximum=0.01),
        sleep=slept.append,
    )
    return client, recorder, slept


def fetch(client: ScenarioClient, url: str = f"{CDN}/a.png", **kwargs: int) -> bytes:
    with client.download(url, chunk_size=5, **kwargs) as chunks:
        return b"".join(chunks)


# -- type and size ------------------------------------------------------------------------


@pytest.mark.parametrize("body", [PNG, JPEG, WEBP, GIF])
@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", None])
def test_images_download_whole(body: bytes, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    client, _, _ = client_for(lambda _: httpx.Response(200, content=body, headers=headers))
    assert fetch(client) == body


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "image/svg+xml"])
def test_a_non_image_content_type_is_refused_before_the_body(content_type: str) -> None:
    client, _, _ = client_for(
        lambda _: httpx.Response(200, content=PNG, headers={"content-type": content_type})
    )
    with pytest.raises(PermanentError, match="not an image"):
        fetch(client)


@pytest.mark.parametrize("body", [b"<html>sign in</html>" * 10, b"{}", b"", b"\x89PN"])
def test_a_body_that_is_not_an_image_is_refused(body: bytes) -> None:
    client, _, _ = client_for(
        lambda _: httpx.Response(200, content=body, headers={"content-type": "image/png"})
    )
    with pytest.raises(PermanentError, match="not a PNG, JPEG, WebP or GIF"):
        fetch(client)


def test_no_byte_of_a_wrong_body_reaches_the_consumer() -> None:
    client, _, _ = client_for(lambda _: httpx.Response(200, content=b"<html>" + b"x" * 1000))
    received: list[bytes] = []
    with pytest.raises(PermanentError), client.download(f"{CDN}/a.png", chunk_size=4) as chunks:
        received.extend(chunks)
    assert received == []


def test_an_announced_size_over_the_cap_is_refused_before_reading() -> None:
    class Endless(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            raise AssertionError("the body must not be read")

    client, _, _ = client_for(
        lambda _: httpx.Response(200, headers={"content-length": "5000"}, stream=Endless())
    )
    with pytest.raises(PermanentError, match="more than the 1000-byte limit"):
        fetch(client, max_bytes=1000)


def test_a_body_growing_past_the_cap_is_cut_and_refused() -> None:
    class Growing(httpx.SyncByteStream):
        def __init__(self) -> None:
            self.sent = 0

        def __iter__(self) -> Iterator[bytes]:
            yield PNG
            while True:  # endless, as /dev/zero behind a CDN would be
                self.sent += 1
                assert self.sent < 10_000, "the client kept reading past its cap"
                yield b"\x00" * 100

    client, _, _ = client_for(lambda _: httpx.Response(200, stream=Growing()))
    with pytest.raises(PermanentError, match="exceeds the 1000-byte limit"):
        fetch(client, max_bytes=1000)


def test_a_cut_image_body_stays_transient() -> None:
    class Cut(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield PNG[:50]
            raise httpx.RemoteProtocolError("peer closed")

    client, _, _ = client_for(lambda _: httpx.Response(200, stream=Cut()))
    with pytest.raises(DownloadIncomplete):
        fetch(client)


def test_image_type_reads_magic_bytes() -> None:
    assert [image_type(b) for b in (PNG, JPEG, WEBP, GIF, b"BM....", b"")] == [
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/gif",
        None,
        None,
    ]


# -- redirects and credentials -----------------------------------------------------------------


def redirecting(hops: int, final_host: str = "cdn2.example.test") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        step = int(request.url.params.get("hop", "0"))
        if step < hops:
            host = final_host if step == hops - 1 else request.url.host
            location = f"https://{host}/a.png?hop={step + 1}"
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})

    return handler


def test_up_to_the_redirect_limit_is_followed_without_credentials() -> None:
    client, recorder, _ = client_for(redirecting(MAX_REDIRECTS))
    assert fetch(client) == PNG
    assert len(recorder.requests) == MAX_REDIRECTS + 1
    assert recorder.requests[-1].url.host == "cdn2.example.test"
    assert all("authorization" not in r.headers for r in recorder.requests)


def test_more_redirects_than_the_limit_are_a_permanent_error() -> None:
    client, recorder, _ = client_for(redirecting(MAX_REDIRECTS + 1))
    with pytest.raises(PermanentError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(client)
    assert len(recorder.requests) == MAX_REDIRECTS + 1


def test_an_asset_path_on_the_api_host_is_fetched_without_credentials() -> None:
    client, recorder, _ = client_for(redirecting(2))
    assert fetch(client, "/assets/a.png") == PNG
    assert recorder.requests[0].url.host == "api.example.test"
    assert all("authorization" not in r.headers for r in recorder.requests)


def test_an_api_redirect_is_never_followed_so_credentials_stay_on_the_api_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example.test":
            return httpx.Response(302, headers={"location": "https://evil.example.test/jobs/1"})
        return httpx.Response(200, json={"job": {}})

    client, recorder, _ = client_for(handler)
    with pytest.raises(PipelineError):
        client.get_job("job_1")
    assert {r.url.host for r in recorder.requests} == {"api.example.test"}


def test_a_non_http_url_is_refused() -> None:
    client, recorder, _ = client_for(lambda _: httpx.Response(200, content=PNG))
    with pytest.raises(PermanentError, match="not an http"):
        fetch(client, "file:///etc/passwd")
    assert recorder.requests == []


# -- uploads ----------------------------------------------------------------------------------


class FakeUploads:
    """POST /uploads, PUT parts to signed URLs, POST .../action complete, GET /uploads/{id}."""

    def __init__(self, *, fail_part_once: bool = False, final: str = "imported") -> None:
        self.parts: dict[int, bytes] = {}
        self.request: dict[str, object] = {}
        self.completed = False
        self.polls = 0
        self.fail_part_once = fail_part_once
        self.final = final
        self.assets_posts = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.url.host == "storage.example.test":
            assert "authorization" not in request.headers
            number = int(request.url.params["partNumber"])
            if self.fail_part_once:
                self.fail_part_once = False
                return httpx.Response(503)
            self.parts[number] = request.content
            return httpx.Response(200, headers={"etag": f'"{number}"'})
        assert request.headers["authorization"].startswith("Basic ")
        if path == "/v1/assets" and request.method == "POST":
            self.assets_posts += 1
            return httpx.Response(200, json={"asset": {"id": "asset_small"}})
        if path == "/v1/uploads" and request.method == "POST":
            self.request = json.loads(request.content)
            count = int(self.request["parts"])  # type: ignore[call-overload]
            parts = [
                {
                    "number": n,
                    "expires": "2025-11-04T11:00:00.000Z",
                    "url": f"https://storage.example.test/up_1?partNumber={n}&X-Amz-Signature=s",
                }
                for n in range(1, count + 1)
            ]
            return httpx.Response(200, json={"upload": self.upload("pending", parts=parts)})
        if path == "/v1/uploads/up_1/action":
            assert json.loads(request.content) == {"action": "complete"}
            self.completed = True
            return httpx.Response(200, json={"upload": self.upload("validating")})
        if path == "/v1/uploads/up_1" and request.method == "GET":
            self.polls += 1
            if self.polls < 2:
                return httpx.Response(200, json={"upload": self.upload("validating")})
            extra = {"entityId": "asset_big"} if self.final != "failed" else {}
            if self.final == "failed":
                extra["errorMessage"] = "not an image"
            return httpx.Response(200, json={"upload": self.upload(self.final, **extra)})
        return httpx.Response(404, json={"message": f"no route {path}"})

    def upload(self, status: str, **extra: object) -> dict[str, object]:
        return {
            "id": "up_1",
            "status": status,
            "kind": "asset",
            "source": "multipart",
            "fileName": "big.png",
            "authorId": "a",
            "ownerId": "o",
            "createdAt": "2025-11-04T10:00:00.000Z",
            "updatedAt": "2025-11-04T10:00:00.000Z",
            **extra,
        }


def big_png(size: int) -> bytes:
    return PNG + bytes(range(256)) * ((size - len(PNG)) // 256 + 1)


def test_small_inputs_are_posted_as_data_urls() -> None:
    fake = FakeUploads()
    client, recorder, _ = client_for(fake)
    assert client.upload_image(PNG, "small.png") == "asset_small"
    body = json.loads(recorder.requests[0].content)
    assert body["image"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fake.request == {}


def test_large_inputs_go_through_multipart_uploads() -> None:
    data = big_png(2 * UPLOAD_PART_BYTES + 12345)
    assert len(data) > DIRECT_UPLOAD_MAX_BYTES
    fake = FakeUploads()
    client, recorder, slept = client_for(fake)
    assert client.upload_image(data, "big.png", "image/png") == "asset_big"
    assert fake.request == {
        "fileName": "big.png",
        "fileSize": len(data),
        "contentType": "image/png",
        "kind": "asset",
        "parts": 3,
    }
    assert b"".join(fake.parts[n] for n in sorted(fake.parts)) == data
    assert sorted(fake.parts) == [1, 2, 3]
    assert fake.completed and fake.polls == 2 and slept
    assert fake.assets_posts == 0  # never a POST /assets that would get 413
    for request in recorder.requests:
        if request.url.host == "storage.example.test":
            assert "authorization" not in request.headers
            assert SECRET not in str(request.url)


def test_a_failed_part_is_retried() -> None:
    fake = FakeUploads(fail_part_once=True)
    client, _, _ = client_for(fake)
    data = big_png(DIRECT_UPLOAD_MAX_BYTES + 1)
    assert client.upload_image(data, "big.png") == "asset_big"
    assert b"".join(fake.parts[n] for n in sorted(fake.parts)) == data


def test_a_failed_upload_is_a_permanent_error_with_the_reason() -> None:
    client, _, _ = client_for(FakeUploads(final="failed"))
    with pytest.raises(PermanentError, match="not an image"):
        client.upload_image(big_png(DIRECT_UPLOAD_MAX_BYTES + 1), "big.png")
