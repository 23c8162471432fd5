"""The HTTP server in front of the Flask app: no single request, slow client or flood can starve ``/health``.

Label Studio gives ``/health`` 1 s and ``/setup`` 3 s, and treats a backend that misses them as gone. Under a
thread-per-connection server (gunicorn's gthread worker, Werkzeug) a client that sends its headers one byte
a second, a task whose media trickles in, or a burst of webhooks holds every thread, and ``/health`` waits
behind them. So connections and work are kept apart:

* **Connections** live in one asyncio event loop (uvicorn with h11): an idle or slow socket costs a file
  descriptor and a small buffer, never a thread. :class:`HeaderTimeoutH11Protocol` closes a connection that
  has not finished its request headers within ``header_timeout_s`` (uvicorn has no such timeout of its own;
  its h11 parser already caps the header size).
* **Bodies** are read completely in the event loop before any thread is involved, against the byte cap
  (``SURGENET_ASSIST_MAX_BODY``, chunked bodies included: 413) and a deadline for the whole body (408).
* **Work** runs on one bounded thread pool per route family (``/predict``; ``/webhook``; everything else:
  ``/setup``, ``/versions``, ``/metrics``), so a flood of one family never takes the threads of another. Past
  a family's threads plus its queue the request is refused at once with 503 and ``Retry-After`` instead of
  queueing without bound.
* **``/health``** (and ``/``) is answered in the event loop from a snapshot that a background thread refreshes
  every ``health_refresh_s`` with the Flask route's own answer (one definition of what health means); it never
  waits on a pool, the model, the store or Label Studio. A snapshot that has not been refreshed for
  ``health_stale_s`` (the refresher itself is stuck, e.g. on a hung database) answers 503 ``DEGRADED``.

``docs/deploy.md`` explains the choice against a buffering proxy; ``bench/hostile.py`` measures it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from a2wsgi import WSGIMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServerLimits

log = logging.getLogger("surgenet_assist.backend")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HEALTH_PATHS = frozenset({"/health", "/"})
#: route -> the pool that runs it; any other path (a 404 included) runs on the "control" pool
ROUTE_FAMILY = {"/predict": "predict", "/webhook": "webhook"}


class _Refused(Exception):
    def __init__(
        self, status: int, error: str, detail: str, hint: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.hint = status, error, detail, hint
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


class _RouteFamily:
    """A bounded pool: ``threads`` run requests, ``queue`` more may wait; the rest are refused at once.

    ``in_flight`` is only touched from the event loop thread, so it needs no lock."""

    def __init__(self, name: str, wsgi_app: Any, threads: int, queue: int) -> None:
        self.name = name
        self.threads, self.capacity = threads, threads + queue
        self.in_flight = 0
        self.refused = 0
        self.runner = WSGIMiddleware(wsgi_app, workers=threads)

    def close(self) -> None:
        self.runner.executor.shutdown(wait=False, cancel_futures=True)


class HealthSnapshot:
    """The Flask ``/health`` answer, recomputed on a daemon thread every ``every_s`` seconds."""

    def __init__(self, flask_app: Any, every_s: float, stale_s: float) -> None:
        self.app, self.every_s, self.stale_s = flask_app, every_s, stale_s
        self._value: tuple[float, int, bytes] | None = None
        self._stop = threading.Event()
        self.refresh()  # the first answer is ready before the server accepts a connection
        self._thread = threading.Thread(target=self._loop, name="surgenet-health", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        view = self.app.view_functions["health.health"]
        try:
            with self.app.test_request_context("/health"):
                resp = self.app.make_response(view())
            self._value = (time.monotonic(), resp.status_code, resp.get_data())
        except Exception as exc:  # noqa: BLE001 - health must report, not raise
            log.exception("health check failed")
            problem = f"health check failed: {exc}"[:300]
            body = {"status": "DOWN", "model_class": "SurgeNetAssist", "problem": problem}
            self._value = (time.monotonic(), 503, json.dumps(body).encode())

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()

    def current(self) -> tuple[int, bytes]:
        assert self._value is not None
        when, status, body = self._value
        age = time.monotonic() - when
        if age <= self.stale_s:
            return status, body
        stale = {
            "status": "DEGRADED",
            "model_class": "SurgeNetAssist",
            "problem": f"health not refreshed for {age:.0f} s (the store or the model is not answering)",
        }
        return 503, json.dumps(stale).encode()

    def close(self) -> None:
        self._stop.set()


class BackendServer:
    """The ASGI application uvicorn serves: ``/health`` from :class:`HealthSnapshot`, every other route
    through its family's bounded pool into the Flask app (``backend.app.create_app``)."""

    def __init__(self, flask_app: Any, limits: ServerLimits | None = None) -> None:
        self.flask_app = flask_app
        self.limits = limits or flask_app.extensions["surgenet"].settings.server_limits()
        self.families = {
            name: _RouteFamily(name, flask_app, *self.limits.family(name))
            for name in ("predict", "webhook", "control")
        }
        self.health = HealthSnapshot(flask_app, self.limits.health_refresh_s, self.limits.health_stale_s)
        services = flask_app.extensions.get("surgenet")
        self._metrics = getattr(services, "metrics", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        path = scope["path"]
        if path in HEALTH_PATHS:
            status, body = self.health.current()
            self._count(path, scope["method"], status)
            await _send_json(send, status, body, head=scope["method"] == "HEAD")
            return
        family = self.families[ROUTE_FAMILY.get(path, "control")]
        route = path if path in ROUTE_FAMILY or path in ("/setup", "/versions", "/metrics") else "unmatched"
        if family.in_flight >= family.capacity:
            family.refused += 1
            self._count(route, scope["method"], 503)
            await _refuse(
                send,
                _Refused(
                    503,
                    "busy",
                    f"{family.name} requests are at their limit ({family.capacity} in flight)",
                    "retry shortly; a flood or slow media holds the pool (raise SURGENET_ASSIST_"
                    f"{family.name.upper()}_THREADS if the load is real)",
                    {"retry-after": "2"},
                ),
            )
            return
        family.in_flight += 1
        try:
            try:
                body = await _read_body(scope, receive, self.limits.max_body, self.limits.body_timeout_s)
            except _Refused as exc:
                self._count(route, scope["method"], exc.status)
                await _refuse(send, exc)
                return
            except _ClientGone:
                return
            await family.runner(_with_length(scope, len(body)), _replay(body), send)
        finally:
            family.in_flight -= 1

    def _count(self, route: str, method: str, status: int) -> None:
        """Requests the Flask app never sees (health, refusals) still show in ``/metrics``."""
        if self._metrics is not None:
            self._metrics.requests.labels(route, method, str(status)).inc()
            if status >= 400:
                self._metrics.errors.labels(route, str(status)).inc()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        self.health.close()
        for family in self.families.values():
            family.close()


async def _read_body(scope: Scope, receive: Receive, limit: int, deadline_s: float) -> bytes:
    """The whole request body, refused past ``limit`` bytes (declared or streamed) or after ``deadline_s``."""
    declared = _header(scope, b"content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            detail = "Content-Length is not a number"
            raise _Refused(400, "bad_content_length", detail, "send a valid length") from None
        if length > limit:
            raise _too_large(limit)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = end - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            raise _Refused(
                408,
                "body_timeout",
                f"the request body did not arrive within {deadline_s:g} s",
                "send the body at network speed (a slow or stalled client is cut off)",
            ) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        piece = message.get("body", b"")
        size += len(piece)
        if size > limit:
            raise _too_large(limit)
        chunks.append(piece)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> _Refused:
    return _Refused(
        413,
        "body_too_large",
        f"request body exceeds {limit} bytes",
        "send fewer tasks per request (ls preannotate --batch) or raise SURGENET_ASSIST_MAX_BODY",
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin1")
    return None


def _with_length(scope: Scope, length: int) -> Scope:
    """The scope as the Flask app must see it: the body is complete, so it has a Content-Length and no
    ``Transfer-Encoding`` (WSGI apps read nothing of a body whose length they do not know)."""
    drop = {b"content-length", b"transfer-encoding"}
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in drop]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # nothing more: the app has what it needs (a disconnect never comes)
        return {"type": "http.disconnect"}

    return receive


async def _send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False
) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _refuse(send: Send, exc: _Refused) -> None:
    body = {"status": exc.status, "error": exc.error, "detail": exc.detail, "hint": exc.hint}
    headers = {"connection": "close", **exc.headers}
    await _send_json(send, exc.status, json.dumps(body).encode(), headers)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers.

    A slowloris client (headers one byte at a time, or a connection opened and never used) is closed after
    ``HEADER_TIMEOUT_S``; uvicorn's own keep-alive timer only covers idle time *between* requests, and it is
    cancelled by the first byte of the next one. uvicorn instantiates the class it is given in each worker
    process, so the deadline is a class attribute that :func:`serve_limits` sets in every worker."""

    HEADER_TIMEOUT_S = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this connection gets the same deadline

    def _arm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = self.loop.call_later(self.HEADER_TIMEOUT_S, self._header_deadline)

    def _header_deadline(self) -> None:
        # still waiting for a request line/headers (IDLE), nothing being served: drop the connection
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


def serve_limits(limits: ServerLimits) -> None:
    """Apply the limits that live outside :class:`BackendServer` (the connection-level header deadline)."""
    HeaderTimeoutH11Protocol.HEADER_TIMEOUT_S = float(limits.header_timeout_s)


class InProcessServer:
    """``app`` (from ``create_app``) served exactly as ``surgenet-assist serve`` serves it (uvicorn,
    :class:`BackendServer`, :class:`HeaderTimeoutH11Protocol`), on a daemon thread of this process: for
    tests, benchmarks and embedding. ``url`` is where it listens; :meth:`stop` shuts it down."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None):
        import socket

        import uvicorn

        limits = limits or app.extensions["surgenet"].settings.server_limits()
        serve_limits(limits)
        self.asgi = BackendServer(app, limits)
        if not port:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(
            self.asgi, host=host, port=port, http=HeaderTimeoutH11Protocol, lifespan="on", log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="surgenet-backend", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the backend server did not start on {self.url}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
