"""The HTTP side: routing, Basic auth, limits, injected faults, the CDN, and `Sandbox` itself."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.sandbox.api import Api
from pipeline.sandbox.catalog import ApiProblem, bad_request
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.inference import ENDPOINTS
from pipeline.sandbox.state import Store
from pipeline.sandbox.uploads import MAX_PART_BYTES, PART_PATH, Uploads

MAX_BODY = 6 * 1024 * 1024  # the API's request payload limit (larger files go via /uploads)
_DRAIN_LIMIT = 64 * 1024 * 1024
_API_PREFIX = "/v1"

# (method, path pattern under /v1, route template, Api method)
ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
    (method, re.compile(pattern + "$"), template, handler)
    for method, pattern, template, handler in (
        ("POST", r"/generate/custom/(?P<model_id>[^/]+)", "/generate/custom/{modelId}", "generate"),
        ("POST", r"/generate/caption", "/generate/caption", "caption"),
        *(
            ("POST", rf"/generate/(?P<inference_type>{name})", f"/generate/{name}", "inference")
            for name in ENDPOINTS
        ),
        ("GET", r"/jobs", "/jobs", "list_jobs"),
        ("GET", r"/jobs/(?P<job_id>[^/]+)", "/jobs/{jobId}", "get_job"),
        ("POST", r"/jobs/(?P<job_id>[^/]+)/action", "/jobs/{jobId}/action", "cancel_job"),
        ("POST", r"/assets", "/assets", "upload"),
        ("DELETE", r"/assets", "/assets", "delete_assets"),
        ("POST", r"/assets/get-bulk", "/assets/get-bulk", "get_bulk"),
        ("GET", r"/assets/(?P<asset_id>[^/]+)", "/assets/{assetId}", "get_asset"),
        ("GET", r"/models/(?P<model_id>[^/]+)", "/models/{modelId}", "get_model"),
        ("POST", r"/uploads", "/uploads", "create_upload"),
        ("GET", r"/uploads/(?P<upload_id>[^/]+)", "/uploads/{uploadId}", "get_upload"),
        (
            "POST",
            r"/uploads/(?P<upload_id>[^/]+)/action",
            "/uploads/{uploadId}/action",
            "upload_action",
        ),
        # In the official SDK, not in the Swagger export:
        ("GET", r"/teams", "/teams", "list_teams"),
        ("GET", r"/teams/(?P<team_id>[^/]+)/limits", "/teams/{teamId}/limits", "team_limits"),
    )
]
#: Routes the official SDK calls that the Swagger export does not list.
SDK_ONLY_ROUTES = {"/teams", "/teams/{teamId}/limits"}
_PART_PATH = re.compile(re.escape(PART_PATH) + r"(?P<upload_id>[A-Za-z0-9_]+)/(?P<number>\d+)$")
_CDN_PATH = re.compile(r"/cdn/(?P<asset_id>asset_[A-Za-z0-9]+)\.(?P<ext>[a-z]+)$")
_CLOUDFRONT_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access denied</Message></Error>"
)
_CLOUDFRONT_MISSING = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
    b"<Message>The specified key does not exist.</Message></Error>"
)


class _Server(ThreadingHTTPServer):
    """A threading server that remembers open connections so stop() can close them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default listen backlog of 5 stalls bursts of new clients

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-request (a killed worker, a reset) is routine for an
        # API server; anything else is still printed.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut every open keep-alive connection down."""
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """One connection; dispatches each request to the API, the CDN or the control routes."""

    protocol_version = "HTTP/1.1"
    server_version = "ScenarioSandbox/1.0"
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True  # never wait for an ACK before sending
    # Buffer writes so headers and a small body leave in one send; handle_one_request()
    # flushes after every request.
    wbufsize = 64 * 1024
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.sandbox.verbose:
            sys.stderr.write(f"sandbox: {self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # --- plumbing ---------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json; charset=utf-8", headers)

    def _read_body(self, limit: int = MAX_BODY) -> bytes | None:
        """The request body, or None after answering 411/413 itself."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._json(411, {"message": "Content-Length is required"})
            return None
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            if length > _DRAIN_LIMIT:
                self.close_connection = True
            else:  # read it all so the client sees the answer rather than a reset
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            self._json(
                413,
                {
                    "message": "Request Too Long: the body exceeds 6 MB; upload "
                    "large files through /uploads",
                    "name": "PayloadTooLargeError",
                },
            )
            return None
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        cfg = self.server.sandbox.store.config
        header = self.headers.get("Authorization") or ""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            key, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return key == cfg.api_key and secret == cfg.api_secret

    def _cdn_base(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.sandbox.base_url

    def _dispatch(self) -> None:
        # The network's round trip, half on the request's way here, half on the answer's
        # way back (the buffered answer leaves when the request is done); control routes
        # are the harness's, not the network's.
        control = self.path.startswith("/_sandbox/")
        half = 0.0 if control else self.server.sandbox.store.config.rtt / 2
        if half:
            time.sleep(half)
        try:
            self._route()
        finally:
            if half:
                time.sleep(half)

    def _route(self) -> None:
        try:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = parse_qs(parts.query)
            if path.startswith("/_sandbox/"):
                self._control(path)
            elif path.startswith("/cdn/"):
                self._cdn(path, query)
            elif path.startswith(PART_PATH):
                self._upload_part(path, query)
            elif path == _API_PREFIX or path.startswith(_API_PREFIX + "/"):
                self._api(path[len(_API_PREFIX) :], query)
            else:
                self._read_body()
                self._json(
                    404, {"message": f"No route for {self.command} {path}", "name": "NotFoundError"}
                )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._json(500, {"message": "internal sandbox error"})

    # --- the API -------------------------------------------------------------------------
    def _api(self, path: str, query: dict[str, list[str]]) -> None:
        sandbox = self.server.sandbox
        store = sandbox.store
        match = next(
            (
                (route, m)
                for route in ROUTES
                if route[0] == self.command and (m := route[1].match(path))
            ),
            None,
        )
        template = match[0][2] if match else "(unknown)"
        with store.lock:
            store.stats.requests[f"{self.command} {template}"] += 1
        raw = self._read_body()
        if raw is None:
            return
        if not self._authorized():
            self._json(401, {"message": "Unauthorized", "name": "UnauthorizedError"})
            return
        wait = store.take_token()
        if wait is not None:
            self._json(
                429,
                {
                    "message": "Too Many Requests: request rate limit exceeded",
                    "name": "RateLimitError",
                },
                {
                    "Retry-After": str(max(1, math.ceil(wait))),
                    "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
                },
            )
            return
        if store.roll(store.config.fault_5xx_rate, "5xx"):
            with store.lock:
                store.stats.faults["5xx"] += 1
                status = store.rng.choice((500, 502, 503))
            self._json(
                status,
                {
                    "message": {
                        500: "Internal Server Error",
                        502: "Bad Gateway",
                        503: "Service Unavailable",
                    }[status]
                },
            )
            return
        if match is None:
            self._json(
                404, {"message": f"No route for {self.command} /v1{path}", "name": "NotFoundError"}
            )
            return
        try:
            status, doc = self._call(match[0][3], match[1].groupdict(), query, raw)
        except ApiProblem as problem:
            status, doc = problem.status, problem.body()
        if store.roll(store.config.fault_drop_rate, "drop"):
            # The request was processed (a job may exist and be billed) but the answer is
            # lost: the case that tempts a client into paying twice.
            with store.lock:
                store.stats.faults["drop"] += 1
            self.close_connection = True
            return
        self._json(status, doc)

    def _call(
        self, name: str, args: dict[str, str], query: dict[str, list[str]], raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        api = self.server.sandbox.api
        uploads = self.server.sandbox.uploads
        body: Any = None
        if self.command in ("POST", "DELETE"):
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                raise bad_request("The request body is not valid JSON") from None
        dry_run = (query.get("dryRun") or [""])[-1].lower() in ("true", "api", "1")
        cdn = self._cdn_base()
        calls: dict[str, Callable[[], tuple[int, dict[str, Any]]]] = {
            "generate": lambda: api.generate(unquote(args.get("model_id", "")), body, dry_run),
            "caption": lambda: api.caption(body, dry_run),
            "inference": lambda: api.generate_inference(args["inference_type"], body, dry_run, cdn),
            "list_jobs": lambda: api.list_jobs(query),
            "get_job": lambda: api.get_job(args["job_id"]),
            "cancel_job": lambda: api.cancel_job(args["job_id"], body),
            "upload": lambda: api.assets.upload(body, cdn),
            "delete_assets": lambda: api.assets.delete(body),
            "get_bulk": lambda: api.assets.get_bulk(body, cdn),
            "get_asset": lambda: api.assets.get_asset(args["asset_id"], cdn),
            "get_model": lambda: api.get_model(args["model_id"]),
            "create_upload": lambda: uploads.create(body, cdn),
            "get_upload": lambda: uploads.retrieve(args["upload_id"], cdn),
            "upload_action": lambda: uploads.action(args["upload_id"], body, cdn),
            "list_teams": api.list_teams,
            "team_limits": lambda: api.team_limits(args["team_id"]),
        }
        return calls[name]()

    # --- the CDN -------------------------------------------------------------------------
    def _cdn(self, path: str, query: dict[str, list[str]]) -> None:
        sandbox = self.server.sandbox
        store = sandbox.store
        with store.lock:
            store.stats.requests[f"{self.command} /cdn/{{assetId}}"] += 1
        self._read_body()
        match = _CDN_PATH.match(path)
        if match is None or self.command not in ("GET", "HEAD"):
            self._send(404, _CLOUDFRONT_MISSING, "text/xml")
            return
        asset_id = match["asset_id"]
        expires = (query.get("Expires") or [""])[-1]
        signature = (query.get("Signature") or [""])[-1]
        if sandbox.api.check_signature(asset_id, expires, signature) is not None:
            self._send(403, _CLOUDFRONT_DENIED, "text/xml")
            return
        asset = store.find_asset(asset_id)
        if asset is None:
            self._send(404, _CLOUDFRONT_MISSING, "text/xml")
            return
        if store.roll(store.config.fault_expired_rate, "expired"):
            with store.lock:
                store.stats.faults["expired"] += 1
            self._send(403, _CLOUDFRONT_DENIED, "text/xml")
            return
        data = store.asset_bytes(asset)
        headers = {"Cache-Control": "private, max-age=0", "ETag": f'"{asset.sha256}"'}
        if self.command == "HEAD":
            self._send(200, data, asset.mime, headers)
            return
        truncate = store.roll(store.config.fault_truncate_rate, "truncate")
        slow = not truncate and store.roll(store.config.fault_slow_rate, "slow")
        if not (truncate or slow):
            self._send(200, data, asset.mime, headers)
            with store.lock:
                store.stats.cdn_downloads += 1
            return
        with store.lock:
            store.stats.faults["truncate" if truncate else "slow"] += 1
        self.send_response(200)
        self.send_header("Content-Type", asset.mime)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        half = len(data) // 2
        self.wfile.write(data[:half])
        self.wfile.flush()
        if truncate:
            self.close_connection = True  # the promised rest never comes
            return
        time.sleep(store.config.slow_seconds)
        self.wfile.write(data[half:])
        with store.lock:
            store.stats.cdn_downloads += 1

    # --- presigned part uploads (S3-like: no Basic auth, XML errors) -------------------------
    def _upload_part(self, path: str, query: dict[str, list[str]]) -> None:
        store = self.server.sandbox.store
        with store.lock:
            store.stats.requests[f"{self.command} {PART_PATH}{{uploadId}}/{{partNumber}}"] += 1
        data = self._read_body(MAX_PART_BYTES)
        if data is None:
            return
        match = _PART_PATH.match(path)
        if match is None or self.command != "PUT":
            self._send(404, _CLOUDFRONT_MISSING, "text/xml")
            return
        status, code, etag = self.server.sandbox.uploads.put_part(
            match["upload_id"], match["number"], query, data
        )
        if code is not None:
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{code}</Message></Error>"
            ).encode()
            self._send(status, body, "application/xml")
            return
        self._send(200, b"", "application/xml", {"ETag": etag or ""})

    # --- control routes (never faulted, no auth) --------------------------------------------
    def _control(self, path: str) -> None:
        sandbox = self.server.sandbox
        raw = self._read_body()
        if raw is None:
            return
        if path == "/_sandbox/stats" and self.command == "GET":
            self._json(200, sandbox.stats())
        elif path == "/_sandbox/reset" and self.command == "POST":
            sandbox.reset()
            self._json(200, {"reset": True})
        elif path == "/_sandbox/config" and self.command == "GET":
            self._json(200, sandbox.store.config.public_dict())
        elif path == "/_sandbox/config" and self.command == "POST":
            try:
                changes = json.loads(raw or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of config fields")
                config = sandbox.configure(**changes)
            except (ValueError, TypeError) as exc:
                self._json(400, {"message": str(exc)})
                return
            self._json(200, config.public_dict())
        else:
            self._json(404, {"message": f"No route for {self.command} {path}"})


class Sandbox:
    """The local Scenario API: start() serves it on a background thread, stop() ends it."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.time,
        verbose: bool = False,
    ) -> None:
        self.store = Store(config or SandboxConfig(), clock)
        self.api = Api(self.store)
        self.uploads = Uploads(self.store, self.api.assets)
        self.host = host
        self.port = port
        self.verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SandboxConfig:
        """The current configuration."""
        return self.store.config

    @property
    def base_url(self) -> str:
        """http://HOST:PORT (the CDN links live under it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL, http://HOST:PORT/v1."""
        return self.base_url + _API_PREFIX

    def start(self) -> Sandbox:
        """Bind the port and serve on a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join the thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def stats(self) -> dict[str, Any]:
        """The stats document (GET /_sandbox/stats)."""
        return self.store.snapshot(self.api.produced())

    def reset(self) -> None:
        """Forget all jobs, assets and counters (POST /_sandbox/reset)."""
        self.store.reset()

    def configure(self, **fields: Any) -> SandboxConfig:
        """Change config fields at runtime (POST /_sandbox/config); ValueError if invalid."""
        return self.store.configure(**fields)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
