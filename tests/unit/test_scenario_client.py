"""ScenarioClient against httpx.MockTransport: parsing, error mapping, retries, downloads."""

from __future__ import annotations

import base64
import email.utils
import json
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from pipeline.errors import (
    ApiPermanentError,
    ApiTransientError,
    AssetUrlExpired,
    AuthError,
    DownloadIncomplete,
    PipelineError,
)
from pipeline.governor import NullGovernor
from pipeline.retry import Backoff
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.scenario import (
    Asset,
    Job,
    JobStatus,
    ScenarioClient,
    check_complete,
    format_time,
    parse_job,
    parse_retry_after,
)

BASE = "https://api.example.test/v1"
CDN = "https://cdn.example.test"
KEY = "key_PUBLIC-ish-4f9a"
SECRET = "s3cr3t-DO-NOT-LEAK-93b1"
BASIC = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()

Handler = Callable[[httpx.Request], httpx.Response]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # downloads must start like an image


def job_json(job_id: str = "job_ocZCnG1Df35XRL1QyCZSRxAG8", status: str = "success") -> dict:
    """A job as GET /jobs/{id} returns it (shape from the Swagger / scenario-sdk)."""
    return {
        "jobId": job_id,
        "jobType": "custom",
        "status": status,
        "progress": 1 if status == "success" else 0.4,
        "createdAt": "2025-11-04T10:00:00.000Z",
        "updatedAt": "2025-11-04T10:00:31.579Z",
        "statusHistory": [
            {"date": "2025-11-04T10:00:00.000Z", "status": "queued"},
            {"date": "2025-11-04T10:00:02.000Z", "status": "in-progress"},
            {"date": "2025-11-04T10:00:31.579Z", "status": status},
        ],
        "authorId": "dcf121faaa1a0a0bbbd9ca1b73d62aea",
        "ownerId": "team_U3Qmc8PCdWXwAQJ4Dvw4tV6D",
        "metadata": {
            "assetIds": ["asset_GTrL3mq4SXWyMxkOHRxlpw", "asset_Hs8kPq2LmN0aZc7XyWv1"],
            "input": {"prompt": "iron sword icon", "seed": 42, "numOutputs": 2},
        },
        "billing": {"cuCost": 12.5, "cuDiscount": 0},
    }


def asset_json(asset_id: str, index: int = 0) -> dict:
    return {
        "id": asset_id,
        "url": f"{CDN}/{asset_id}.png?Policy=abc&Signature=sig&Key-Pair-Id=K1",
        "mimeType": "image/png",
        "kind": "image",
        "status": "success",
        "outputIndex": index,
        "metadata": {"type": "txt2img", "kind": "image", "width": 1024, "height": 768},
        "properties": {"width": 1024, "height": 768, "size": 12345},
    }


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer


def make_client(
    handler: Handler, *, read_retry: Backoff | None = None, governor: Any = None
) -> tuple[ScenarioClient, list[float]]:
    slept: list[float] = []
    client = ScenarioClient(
        BASE,
        KEY,
        SECRET,
        transport=httpx.MockTransport(handler),
        governor=governor,
        read_retry=read_retry,
        sleep=slept.append,
    )
    return client, slept


# ---------------------------------------------------------------- parsing


def test_parses_a_realistic_job() -> None:
    job = parse_job(job_json())
    assert job == Job(
        id="job_ocZCnG1Df35XRL1QyCZSRxAG8",
        status=JobStatus.SUCCESS,
        progress=1.0,
        created_at=datetime(2025, 11, 4, 10, 0, tzinfo=UTC),
        updated_at=datetime(2025, 11, 4, 10, 0, 31, 579000, tzinfo=UTC),
        asset_ids=("asset_GTrL3mq4SXWyMxkOHRxlpw", "asset_Hs8kPq2LmN0aZc7XyWv1"),
        error=None,
        hint=None,
        cost=12.5,
        input={"prompt": "iron sword icon", "seed": 42, "numOutputs": 2},
        model_id=None,
        job_type="custom",
    )
    assert job.raw["statusHistory"][0]["status"] == "queued"


def test_fixture_is_a_valid_job_for_the_official_sdk() -> None:
    sdk = pytest.importorskip("scenario_sdk.types.job_retrieve_response")
    parsed = sdk.JobRetrieveResponse.model_validate({"job": job_json()})
    assert parsed.job.metadata.asset_ids == list(parse_job(job_json()).asset_ids)


def test_parses_a_failed_job_with_error_and_hint() -> None:
    data = job_json(status="failure")
    data["metadata"] = {"error": "NSFW content detected", "hint": "Rephrase the prompt"}
    del data["billing"]
    job = parse_job(data)
    assert job.status is JobStatus.FAILURE and job.status.terminal
    assert (job.error, job.hint, job.cost, job.asset_ids) == (
        "NSFW content detected",
        "Rephrase the prompt",
        None,
        (),
    )


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("pending", False),
        ("queued", False),
        ("warming-up", False),
        ("in-progress", False),
        ("finalizing", False),
        ("success", True),
        ("failure", True),
        ("canceled", True),
    ],
)
def test_terminal_statuses(status: str, terminal: bool) -> None:
    assert JobStatus(status).terminal is terminal


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_statuses_of_other_objects_are_not_job_statuses(status: str) -> None:
    with pytest.raises(ApiPermanentError, match="not a job"):
        parse_job(job_json(status=status))


# ---------------------------------------------------------------- requests


def test_api_requests_carry_basic_auth_and_user_agent() -> None:
    recorder = Recorder(httpx.Response(200, json={"job": job_json()}))
    client, _ = make_client(recorder)
    client.get_job("job_1")
    request = recorder.requests[0]
    assert request.url == f"{BASE}/jobs/job_1"
    assert request.headers["authorization"] == BASIC
    assert request.headers["user-agent"].startswith("scenario-pipeline/")


def test_project_id_is_sent_with_every_api_request() -> None:
    recorder = Recorder(httpx.Response(200, json={"jobs": []}))
    client = ScenarioClient(
        BASE, KEY, SECRET, transport=httpx.MockTransport(recorder), project_id="proj_1"
    )
    list(client.iter_jobs(status="success"))
    params = recorder.requests[0].url.params
    assert (params["projectId"], params["status"]) == ("proj_1", "success")


def test_generate_posts_the_body_and_returns_the_submission() -> None:
    recorder = Recorder(
        httpx.Response(200, json={"job": job_json(status="queued"), "creativeUnitsCost": 7})
    )
    client, _ = make_client(recorder)
    body = {"prompt": "iron sword icon", "seed": 42, "modelId": "model_abc123"}
    submission = client.generate("model_bfl-flux-2-dev", body)
    request = recorder.requests[0]
    assert (request.method, request.url.path) == (
        "POST",
        "/v1/generate/custom/model_bfl-flux-2-dev",
    )
    assert json.loads(request.content) == body
    assert submission.creative_units == 7.0
    assert submission.job.status is JobStatus.QUEUED


def test_generate_sends_nothing_when_before_send_aborts() -> None:
    recorder = Recorder(httpx.Response(200, json={"job": job_json(status="queued")}))
    governor = NullGovernor()
    client, _ = make_client(recorder, governor=governor)
    calls: list[int] = []

    def lost_claim() -> None:
        calls.append(governor.acquired)  # runs after the governor let the request through
        raise LookupError("claim lost")

    with pytest.raises(LookupError):
        client.generate("model_x", {"prompt": "p", "seed": 1}, before_send=lost_claim)
    assert calls == [1]
    assert recorder.requests == []


def test_dry_run_returns_the_cost_from_a_269() -> None:
    recorder = Recorder(httpx.Response(269, json={"creativeUnitsCost": 3.5}))
    client, _ = make_client(recorder)
    assert client.dry_run("model_x", {"prompt": "p"}) == 3.5
    assert recorder.requests[0].url.params["dryRun"] == "true"


def test_dry_run_refuses_an_answer_that_started_a_job() -> None:
    client, _ = make_client(Recorder(httpx.Response(200, json={"job": job_json()})))
    with pytest.raises(ApiPermanentError, match="instead of a dry run"):
        client.dry_run("model_x", {"prompt": "p"})


def test_cancel_posts_the_cancel_action() -> None:
    recorder = Recorder(httpx.Response(200, json={"job": job_json(status="canceled")}))
    client, _ = make_client(recorder)
    assert client.cancel_job("job_1").status is JobStatus.CANCELED
    request = recorder.requests[0]
    assert request.url.path == "/v1/jobs/job_1/action"
    assert json.loads(request.content) == {"action": "cancel"}


def test_upload_sends_a_data_url_as_json() -> None:
    recorder = Recorder(httpx.Response(200, json={"asset": asset_json("asset_up1")}))
    client, _ = make_client(recorder)
    assert client.upload_image(b"\x89PNG-bytes", "shield.png") == "asset_up1"
    sent = json.loads(recorder.requests[0].content)
    assert sent == {
        "image": "data:image/png;base64," + base64.b64encode(b"\x89PNG-bytes").decode(),
        "name": "shield.png",
    }


def test_get_asset_parses_url_size_and_index() -> None:
    client, _ = make_client(Recorder(httpx.Response(200, json={"asset": asset_json("asset_a", 1)})))
    asset = client.get_asset("asset_a")
    assert asset == Asset(
        id="asset_a",
        url=f"{CDN}/asset_a.png?Policy=abc&Signature=sig&Key-Pair-Id=K1",
        mime_type="image/png",
        width=1024,
        height=768,
        output_index=1,
        status="success",
    )


def test_get_assets_chunks_at_200_and_keeps_the_order_asked() -> None:
    def bulk(request: httpx.Request) -> httpx.Response:
        ids = json.loads(request.content)["assetIds"]
        return httpx.Response(200, json={"assets": [asset_json(i) for i in reversed(ids)]})

    recorder = Recorder(bulk)
    client, _ = make_client(recorder)
    ids = [f"asset_{n:04d}" for n in range(450)]
    assets = client.get_assets(ids)
    sizes = [len(json.loads(r.content)["assetIds"]) for r in recorder.requests]
    assert sizes == [200, 200, 50]
    assert [a.id for a in assets] == ids


def test_get_assets_of_nothing_makes_no_request() -> None:
    recorder = Recorder(httpx.Response(500))
    client, _ = make_client(recorder)
    assert client.get_assets([]) == []
    assert recorder.requests == []


def test_get_model_returns_the_model_dict() -> None:
    model = {"id": "model_x", "inputs": [{"name": "prompt", "type": "string"}]}
    client, _ = make_client(Recorder(httpx.Response(200, json={"model": model})))
    assert client.get_model("model_x") == model


# ---------------------------------------------------------------- pagination


def test_iter_jobs_follows_tokens_across_short_and_empty_pages() -> None:
    pages = {
        None: {"jobs": [job_json("job_1"), job_json("job_2")], "nextPaginationToken": "t1"},
        "t1": {"jobs": [], "nextPaginationToken": "t2"},
        "t2": {"jobs": [job_json("job_3")], "nextPaginationToken": "t3"},
        "t3": {"jobs": [job_json("job_4")]},
    }

    def page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("paginationToken")])

    recorder = Recorder(page)
    client, _ = make_client(recorder)
    since = datetime(2025, 11, 4, 10, 0, tzinfo=UTC)
    jobs = list(client.iter_jobs(status="success", updated_after=since, page_size=500))
    assert [j.id for j in jobs] == ["job_1", "job_2", "job_3", "job_4"]
    assert [r.url.params.get("paginationToken") for r in recorder.requests] == [
        None,
        "t1",
        "t2",
        "t3",
    ]
    first = recorder.requests[0].url.params
    assert first["pageSize"] == "100"  # the API's maximum
    assert first["status"] == "success"
    assert first["updatedAfter"] == "2025-11-04T10:00:00.000Z"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"updated_after": datetime(2025, 1, 1, tzinfo=UTC)},
        {"created_after": datetime(2025, 1, 1, tzinfo=UTC), "status": "success"},
        {"created_after": datetime(2025, 1, 1, tzinfo=UTC), "job_type": "custom"},
    ],
)
def test_iter_jobs_rejects_filters_the_api_refuses(kwargs: dict[str, Any]) -> None:
    recorder = Recorder(httpx.Response(200, json={"jobs": []}))
    client, _ = make_client(recorder)
    with pytest.raises(ValueError):
        list(client.iter_jobs(**kwargs))
    assert recorder.requests == []


def test_iter_jobs_by_type_since_a_watermark() -> None:
    recorder = Recorder(httpx.Response(200, json={"jobs": [job_json()]}))
    client, _ = make_client(recorder)
    since = datetime(2025, 11, 4, 10, 0, tzinfo=UTC)
    assert len(list(client.iter_jobs(job_type="custom", updated_after=since))) == 1
    params = recorder.requests[0].url.params
    assert (params["type"], params["updatedAfter"]) == ("custom", "2025-11-04T10:00:00.000Z")


def test_iter_jobs_stops_on_a_repeated_token() -> None:
    page = httpx.Response(200, json={"jobs": [], "nextPaginationToken": "same"})
    client, _ = make_client(Recorder(page))
    with pytest.raises(ApiPermanentError, match="repeated"):
        list(client.iter_jobs())


def test_format_time_writes_utc_with_z() -> None:
    paris = datetime(2025, 11, 4, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(paris) == "2025-11-04T11:00:00.123Z"
    assert format_time(datetime(2025, 1, 2, 3, 4, 5)) == "2025-01-02T03:04:05.000Z"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (400, {"message": "prompt is required"}, ApiPermanentError, "prompt is required"),
        (404, {"name": "NotFoundError"}, ApiPermanentError, "NotFoundError"),
        (409, {"error": "job already canceled"}, ApiPermanentError, "already canceled"),
        (422, {"message": "width must be <= 2048"}, ApiPermanentError, "2048"),
        (401, {"message": "Invalid credentials"}, AuthError, "Invalid credentials"),
        (403, {"name": "UnauthorizedError"}, AuthError, "UnauthorizedError"),
        (
            403,
            {"name": "ModelAccessRestrictedError", "message": "no access to model"},
            ApiPermanentError,
            "no access to model",
        ),
        (429, {"message": "Too many parallel jobs"}, ApiTransientError, "parallel jobs"),
        (500, {"message": "Internal error"}, ApiTransientError, "Internal error"),
        (502, "<html>Bad gateway</html>", ApiTransientError, "Bad gateway"),
        (503, None, ApiTransientError, "Service Unavailable"),
    ],
)
def test_status_codes_map_to_errors_with_the_apis_message(
    status: int, body: Any, error: type[PipelineError], message: str
) -> None:
    if isinstance(body, dict):
        response = httpx.Response(status, json=body)
    else:
        response = httpx.Response(status, text=body or "")
    client, _ = make_client(Recorder(response))
    with pytest.raises(error) as caught:
        client.get_job("job_1")
    assert type(caught.value) is error
    text = str(caught.value)
    assert text.startswith(f"GET /jobs/job_1 -> {status}")
    assert message in text
    assert caught.value.status_code == status  # type: ignore[attr-defined]


def test_permanent_errors_carry_name_and_hint() -> None:
    body = {"name": "ValidationError", "message": "bad seed", "hint": "use an integer"}
    client, _ = make_client(Recorder(httpx.Response(400, json=body)))
    with pytest.raises(ApiPermanentError) as caught:
        client.generate("model_x", {"seed": "x"})
    assert (caught.value.name, caught.value.hint) == ("ValidationError", "use an integer")


@pytest.mark.parametrize(
    ("status", "header", "error"),
    [(503, "false", ApiPermanentError), (400, "true", ApiTransientError)],
)
def test_x_should_retry_overrides_the_status(
    status: int, header: str, error: type[PipelineError]
) -> None:
    response = httpx.Response(status, json={"message": "m"}, headers={"x-should-retry": header})
    client, _ = make_client(Recorder(response))
    with pytest.raises(error):
        client.generate("model_x", {})


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
def test_transport_failures_are_transient_connection_errors(failure: Exception) -> None:
    client, _ = make_client(Recorder(failure))
    with pytest.raises(ApiTransientError, match=r"POST /generate/custom/model_x: connection error"):
        client.generate("model_x", {})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the precise one wins
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now = datetime(2025, 11, 4, 10, 0, tzinfo=UTC).timestamp()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=now) == 0.0


def test_a_rate_limit_429_penalizes_the_governor_with_retry_after() -> None:
    governor = NullGovernor()
    response = httpx.Response(
        429,
        json={"message": "Too Many Requests: rate limit exceeded"},
        headers={"Retry-After": "4"},
    )
    client, _ = make_client(Recorder(response), governor=governor)
    with pytest.raises(ApiTransientError) as caught:
        client.generate("model_x", {})
    assert caught.value.retry_after == 4.0 and not caught.value.concurrency
    assert governor.penalties == [4.0]
    assert governor.acquired == 1
    with pytest.raises(ApiTransientError):
        client.get_job("job_1")  # a 429 on a read is always the rate limit
    assert governor.penalties == [4.0, 4.0]


def test_a_generation_refused_for_concurrency_slows_no_one_else() -> None:
    """API.md: a 429 on a generation is the plan's parallel-jobs cap, not the request rate."""
    governor = NullGovernor()
    response = httpx.Response(
        429,
        json={"message": "Too many running jobs: parallel jobs limit (8) reached"},
        headers={"Retry-After": "4"},
    )
    client, _ = make_client(Recorder(response), governor=governor)
    with pytest.raises(ApiTransientError) as caught:
        client.generate("model_x", {}, endpoint="txt2img")
    assert caught.value.concurrency
    assert governor.penalties == []


# ---------------------------------------------------------------- retries


RETRY = Backoff(initial=0.5, maximum=8.0, jitter=0.0, max_attempts=3)


@pytest.mark.parametrize(
    "failure",
    [httpx.Response(503, json={"message": "busy"}), httpx.ConnectError("refused")],
)
def test_generate_is_never_retried(failure: httpx.Response | Exception) -> None:
    recorder = Recorder(failure, httpx.Response(200, json={"job": job_json()}))
    client, slept = make_client(recorder, read_retry=RETRY)
    with pytest.raises(ApiTransientError):
        client.generate("model_x", {"prompt": "p"})
    assert len(recorder.requests) == 1 and slept == []


def test_get_job_is_retried_then_succeeds() -> None:
    governor = NullGovernor()
    recorder = Recorder(
        httpx.Response(429, json={"message": "slow"}, headers={"retry-after-ms": "1200"}),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"job": job_json()}),
    )
    client, slept = make_client(recorder, read_retry=RETRY, governor=governor)
    assert client.get_job("job_1").status is JobStatus.SUCCESS
    assert len(recorder.requests) == 3
    assert slept == [1.2, 1.0]  # Retry-After as a floor, then the backoff
    assert governor.acquired == 3 and governor.penalties == [1.2]


def test_get_job_gives_up_after_the_read_policy() -> None:
    recorder = Recorder(httpx.Response(500, json={"message": "down"}))
    client, slept = make_client(recorder, read_retry=RETRY)
    with pytest.raises(ApiTransientError, match="down"):
        client.get_job("job_1")
    assert len(recorder.requests) == 3 and slept == [0.5, 1.0]


def test_permanent_errors_are_not_retried_on_reads() -> None:
    recorder = Recorder(httpx.Response(404, json={"message": "no such job"}))
    client, slept = make_client(recorder, read_retry=RETRY)
    with pytest.raises(ApiPermanentError):
        client.get_job("job_missing")
    assert len(recorder.requests) == 1 and slept == []


# ---------------------------------------------------------------- downloads


def cdn_and_api(cdn: Handler) -> Recorder:
    """API requests get a job; CDN requests go to `cdn`."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example.test":
            return cdn(request)
        return httpx.Response(200, json={"job": job_json()})

    return Recorder(route)


def download_all(client: ScenarioClient, url: str) -> bytes:
    with client.download(url, chunk_size=4) as chunks:
        return b"".join(chunks)


def test_download_streams_bytes_without_the_api_credentials() -> None:
    body = PNG_MAGIC + b"PNG" * 100
    recorder = cdn_and_api(lambda _: httpx.Response(200, content=body))
    client, _ = make_client(recorder)
    client.get_job("job_1")
    url = f"{CDN}/asset_a.png?Policy=p&Signature=s&Key-Pair-Id=k"
    assert download_all(client, url) == body
    api, cdn = recorder.requests
    assert api.headers["authorization"] == BASIC
    assert "authorization" not in cdn.headers
    assert cdn.url.params["Signature"] == "s"


@pytest.mark.parametrize("status", [401, 403, 410])
def test_download_refused_by_the_cdn_means_the_url_expired(status: int) -> None:
    client, _ = make_client(cdn_and_api(lambda _: httpx.Response(status, text="AccessDenied")))
    with pytest.raises(AssetUrlExpired) as caught:
        download_all(client, f"{CDN}/a.png?Signature=very-secret-sig")
    assert "very-secret-sig" not in str(caught.value)


def test_download_5xx_is_transient() -> None:
    client, _ = make_client(cdn_and_api(lambda _: httpx.Response(503)))
    with pytest.raises(ApiTransientError, match="503"):
        download_all(client, f"{CDN}/a.png")


class ShortStream(httpx.SyncByteStream):
    """Announces more than it sends, or dies mid-body."""

    def __init__(self, chunks: list[bytes], fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail = fail

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail is not None:
            raise self.fail


def test_download_shorter_than_content_length_is_incomplete() -> None:
    def short(_: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-length": "100"}, stream=ShortStream([PNG_MAGIC + b"x" * 52])
        )

    client, _ = make_client(cdn_and_api(short))
    with pytest.raises(DownloadIncomplete, match="60 of 100"):
        download_all(client, f"{CDN}/a.png")


def test_download_cut_mid_body_is_incomplete() -> None:
    def cut(_: httpx.Request) -> httpx.Response:
        stream = ShortStream([b"x" * 10], fail=httpx.RemoteProtocolError("peer closed"))
        return httpx.Response(200, stream=stream)

    client, _ = make_client(cdn_and_api(cut))
    with pytest.raises(DownloadIncomplete, match="cut mid-body"):
        download_all(client, f"{CDN}/a.png")


@pytest.mark.parametrize(("received", "expected"), [(100, 100), (5, None), (101, 100)])
def test_check_complete_accepts_whole_bodies(received: int, expected: int | None) -> None:
    check_complete("cdn/a.png", received, expected)


def test_check_complete_rejects_a_short_body() -> None:
    with pytest.raises(DownloadIncomplete):
        check_complete("cdn/a.png", 99, 100)


# ---------------------------------------------------------------- credentials


def echo_secret(status: int) -> Handler:
    """A server that (wrongly) echoes the credentials back in its error body."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            json={"message": f"bad auth {request.headers['authorization']} {KEY}:{SECRET}"},
        )

    return handler


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (echo_secret(401), AuthError),
        (echo_secret(400), ApiPermanentError),
        (echo_secret(429), ApiTransientError),
        (echo_secret(500), ApiTransientError),
        (Recorder(httpx.ConnectError(f"refused {SECRET}")), ApiTransientError),
    ],
)
def test_credentials_never_appear_in_api_errors(handler: Handler, error: type[Exception]) -> None:
    client, _ = make_client(handler)
    with pytest.raises(error) as caught:
        client.generate("model_x", {})
    assert_no_secret(caught.value)


@pytest.mark.parametrize(
    ("cdn", "error"),
    [
        (lambda _: httpx.Response(403), AssetUrlExpired),
        (
            lambda _: httpx.Response(200, headers={"content-length": "9"}, stream=ShortStream([])),
            DownloadIncomplete,
        ),
    ],
)
def test_credentials_never_appear_in_download_errors(cdn: Handler, error: type[Exception]) -> None:
    client, _ = make_client(cdn_and_api(cdn))
    with pytest.raises(error) as caught:
        download_all(client, f"{CDN}/a.png")
    assert_no_secret(caught.value)


def test_client_repr_and_attributes_hold_no_credentials() -> None:
    client, _ = make_client(Recorder(httpx.Response(200)))
    for text in (repr(client), str(client), repr(vars(client))):
        assert KEY not in text and SECRET not in text
    assert repr(client) == f"ScenarioClient(base_url='{BASE}')"


def assert_no_secret(exc: BaseException) -> None:
    rendered = "".join(traceback.format_exception(exc)) + repr(exc) + str(vars(exc))
    for needle in (KEY, SECRET, BASIC.split()[1]):
        assert needle not in rendered


def test_an_idle_connection_is_kept_through_a_job_of_several_seconds() -> None:
    """Between a wave's POSTs and the next (jobs of 5 s or more), or a collect's downloads
    and the next, the connections wait idle: they are kept (30 s), not dropped after
    httpx's default 5 s, so the next requests need no new connection (a TLS handshake each
    against the real API). The sandbox is a real server on loopback."""
    with Sandbox(SandboxConfig(seed=1)) as sandbox:
        client = ScenarioClient(sandbox.url, "sandbox", "sandbox", timeout=5)
        try:
            client.get_model("model_bfl-flux-2-dev")
            server = sandbox._server
            assert server is not None
            with server.connections_lock:
                before = set(server.connections)
            assert len(before) == 1
            time.sleep(6.0)
            client.get_model("model_bfl-flux-2-dev")
            with server.connections_lock:
                assert server.connections == before
        finally:
            client.close()
