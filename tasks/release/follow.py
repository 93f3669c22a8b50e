"""``tuneline serve --follow-latest``: a front proxy that keeps serving while LATEST moves.

vLLM cannot swap the model of a running server, so the proxy listens on the user's host/port and
forwards every request to an engine (:class:`tasks.release.serving.Engine`) on a private port. A
poller reads LATEST (local folder or S3) every few seconds; when it names another release (a nightly
release, a promote, a rollback) a new engine starts *beside* the old one, must answer a real chat
request, and only then does traffic switch. Requests already on the old engine — streams included —
finish there; the old engine stops when its last one is done. If the new release cannot be served,
the old engine keeps serving and the failure is logged (it is tried again when LATEST moves again).

Why a hand-written proxy: the switch needs the proxy to know, per engine, how many requests are still
in flight and to stop that engine exactly when they are done; a general reverse proxy (nginx, traefik)
would need a reload plus a separate drain watcher, and none ships in the project's environment. It is
~60 lines on what Prefect already brings (starlette for the routes, httpx for streaming upstream
requests, uvicorn to listen). Every response carries ``x-tuneline-release: MODEL/ID``; ``GET
/tuneline/status`` says which release serves and which one is starting.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tasks.release.serving import QUESTION, Engine, start_engine

# Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded; content-length is recomputed by the server.
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
HOP |= {"upgrade", "host", "content-length"}


class Slot:
    """An engine and the number of requests it is still answering."""

    def __init__(self, engine: Engine, answer: str):
        self.engine, self.answer = engine, answer
        self.inflight = 0


class Router:
    """Which engine answers new requests; switching and draining."""

    def __init__(self, first: Slot, log: Callable[[str], Any] = print):
        self.lock = threading.Lock()
        self.current = first
        self.starting: Engine | None = None
        self.retired: list[Slot] = []
        self.failed: dict[str, str] = {}
        self.log = log

    def acquire(self) -> Slot:
        with self.lock:
            slot = self.current
            slot.inflight += 1
            return slot

    def release(self, slot: Slot) -> None:
        with self.lock:
            slot.inflight -= 1

    def switch(self, new: Slot, drain_timeout: float) -> None:
        """New requests go to ``new``; the old engine stops once its requests are done."""
        with self.lock:
            old, self.current = self.current, new
            self.retired.append(old)
        e = new.engine
        self.log(f"switched to {e.name}/{e.release_id} ({e.base_url}); draining {old.engine.release_id}")
        deadline = time.monotonic() + drain_timeout
        while old.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        if old.inflight:
            self.log(f"{old.inflight} requests still on {old.engine.release_id} after {drain_timeout:.0f}s; stopping")
        old.engine.stop()
        with self.lock:
            self.retired.remove(old)
        self.log(f"stopped the engine of {old.engine.name}/{old.engine.release_id}")

    def stop_all(self) -> None:
        """Every engine this router knows of (serving, draining, starting) is stopped."""
        with self.lock:
            engines = [self.current.engine, *(s.engine for s in self.retired)]
            starting = self.starting
        if starting is not None:
            starting.stop()  # its start() loop sees the exit and raises in the poller thread
        for engine in engines:
            engine.stop()

    def status(self) -> dict[str, Any]:
        with self.lock:
            e = self.current.engine
            return {
                "model": e.name,
                "release_id": e.release_id,
                "engine": e.base_url,
                "answer": self.current.answer,
                "inflight": self.current.inflight,
                "draining": [s.engine.release_id for s in self.retired],
                "starting": self.starting.release_id if self.starting else None,
                "failed": dict(self.failed),
            }


def app(router: Router):
    """The ASGI app: ``/tuneline/status``, and everything else forwarded to the current engine."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    # No read timeout: a long generation is not an error. One client, many connections.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(max_connections=None))

    async def status(request: Request):
        return JSONResponse(router.status())

    async def forward(request: Request):
        slot = router.acquire()
        engine = slot.engine
        release = f"{engine.name}/{engine.release_id}"
        url = engine.base_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        try:
            upstream = await client.send(
                client.build_request(request.method, url, headers=headers, content=await request.body()), stream=True
            )
        except httpx.HTTPError as e:
            router.release(slot)
            return JSONResponse(
                {"error": f"engine of {release} unreachable: {type(e).__name__}"},
                status_code=502,
                headers={"x-tuneline-release": release},
            )

        async def body():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:  # also when the client goes away mid-stream
                await upstream.aclose()
                router.release(slot)

        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        out["x-tuneline-release"] = release
        return StreamingResponse(body(), status_code=upstream.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(
        routes=[Route("/tuneline/status", status), Route("/{path:path}", forward, methods=methods)], lifespan=lifespan
    )


def poll(
    router: Router,
    stop: threading.Event,
    *,
    store: Any,
    model: str,
    cache: Path,
    python: str,
    log_dir: Path,
    every: float,
    drain_timeout: float,
    log: Callable[[str], Any] = print,
    **engine_kwargs: Any,
) -> None:
    """Watch LATEST until ``stop`` is set; start, check and switch to each new release (a thread's body)."""
    from tasks.artifacts.registry import latest_release

    while not stop.wait(every):
        try:
            rid = latest_release(store, model)
        except Exception as e:  # noqa: BLE001 - a store hiccup: keep serving, read again next time
            log(f"could not read LATEST of {model}: {type(e).__name__}: {e}")
            continue
        with router.lock:
            serving = router.current.engine.release_id
        if rid is None or rid == serving or rid in router.failed:
            continue
        log(f"LATEST of {model} moved: {serving} -> {rid}; starting its engine beside the current one")
        try:
            engine, answer = start_engine(
                store,
                model,
                rid,
                cache=cache,
                python=python,
                log_dir=log_dir,
                log=log,
                on_started=lambda e: setattr(router, "starting", e),
                **engine_kwargs,
            )
        except BaseException as e:  # noqa: BLE001 - the old engine keeps serving; said once per release
            router.starting = None
            if stop.is_set():
                return
            router.failed[rid] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log(f"release {model}/{rid} cannot be served; still serving {serving}: {router.failed[rid]}")
            continue
        router.starting = None
        if stop.is_set():
            engine.stop()
            return
        log(f"{model}/{rid} answered {QUESTION!r}: {answer!r}")
        router.switch(Slot(engine, answer), drain_timeout)
