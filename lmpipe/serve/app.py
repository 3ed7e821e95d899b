"""The HTTP service of an exported model (Starlette on uvicorn): predict, health, metrics, model.

    POST /predict   {"text": "..."} or {"texts": ["...", ...]}  -> {"predictions": [...], ...}
    GET  /health    liveness and the backend (never needs the token)
    GET  /metrics   Prometheus text format (lmpipe.serve.metrics)
    GET  /model     the lineage of what is served: DVC md5, git revision, params hash, backend

With `LMPIPE_SERVE_TOKEN` set, every endpoint but /health needs `Authorization: Bearer <token>`.
Refusals are JSON `{"error": "<one line>"}` with 400/401/413/422/503; an unexpected failure is a
500 naming a reference to the server log, never a traceback. Inputs are not logged unless
`log_inputs` is on, and then masked (lmpipe.serve.guard.mask). Drift: each model call adds its
texts' statistics to the window (lmpipe.monitor.drift); a statistic crossing its threshold is
one warning line and `lmpipe_drift_alerts_total`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmpipe.monitor.drift import level
from lmpipe.serve.batcher import MicroBatcher
from lmpipe.serve.engine import Engine, Prediction
from lmpipe.serve.guard import TOKEN_ENV, BearerToken, Limits, Refused, check_length_header, mask, parse_texts
from lmpipe.serve.metrics import CONTENT_TYPE, ServeMetrics

log = logging.getLogger("lmpipe.serve")
CONFIG_ENV = "LMPIPE_SERVE_CONFIG"  # how `lmpipe serve --workers N` hands its settings to each worker
ENDPOINTS = ("/predict", "/health", "/metrics", "/model")
DRAIN_BYTES = 16 << 20  # an oversized body up to 16 MiB is read and dropped so its client sees the 413


@dataclass
class ServeConfig:
    """Everything a server process needs; `lmpipe serve` flags fill it."""

    model: str = "models/export"
    backend: str = "auto"
    threads: int = 0
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    max_queue: int = 1024
    limits: Limits = field(default_factory=Limits)
    log_inputs: bool = False
    drift: dict[str, Any] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        data = json.loads(os.environ[CONFIG_ENV])
        return cls(**{**data, "limits": Limits(**data["limits"])})


def error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class Service:
    """The engine, batcher, metrics and token of one server process, and its route handlers."""

    def __init__(self, config: ServeConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine or Engine(config.model, config.backend, config.threads, config.max_batch, config.drift)
        self.token = BearerToken(os.environ.get(TOKEN_ENV))
        self.metrics = ServeMetrics(self.engine.labels, self.engine.statistics)
        info = self.engine.info
        self.metrics.model_info.labels(
            backend=info["backend"], revision=str(info.get("git_revision")), md5=str(info.get("dvc_md5"))
        ).set(1)
        if self.engine.window is not None:
            self.metrics.drift_threshold.set(self.engine.window.threshold)
        self.batcher = MicroBatcher(
            self._run_batch,
            lambda p, a, b: Prediction(p.probs[a:b], p.lengths[a:b], p.unknown[a:b]),
            max_batch=config.max_batch,
            wait_ms=config.batch_wait_ms,
            max_queue=config.max_queue,
            on_batch=self.metrics.batch_size.observe,
        )

    # ------------------------------------------------------------------ model thread
    def _run_batch(self, texts: list[str]) -> Prediction:
        prediction = self.engine.predict(texts)
        predicted = prediction.probs.argmax(axis=1)
        self.metrics.texts.inc(len(texts))
        for i in predicted.tolist():
            self.metrics.predictions.labels(label=self.engine.labels[i]).inc()
        window = self.engine.window
        if window is not None:
            crossed = window.observe(prediction.lengths, prediction.unknown, predicted)
            figures = window.figures()
            self.metrics.drift_window.set(len(window.rows))
            for name, value in (figures or {}).items():
                self.metrics.drift_psi.labels(statistic=name).set(value)
                self.metrics.drift_alert.labels(statistic=name).set(int(window.above[name]))
            for name in crossed:
                self.metrics.drift_alerts.labels(statistic=name).inc()
                log.warning(
                    "drift alert: %s PSI %.3f > %.3f over the last %d texts (%s shift)",
                    name,
                    figures[name],
                    window.threshold,
                    len(window.rows),
                    level(figures[name]),
                )
        return prediction

    # ------------------------------------------------------------------ routes
    async def predict(self, request: Request) -> Response:
        self.token.check(request.headers.get("authorization"))
        limits = self.config.limits
        check_length_header(request.headers.get("content-length"), DRAIN_BYTES)
        body = await read_body(request, limits.max_body_bytes)
        texts = parse_texts(body, limits)
        if self.config.log_inputs:
            for text in texts:
                log.info("input: %s", mask(text))
        result: Prediction = await self.batcher.submit(texts)
        labels = self.engine.labels
        rows = []
        for probs in result.probs:
            best = int(probs.argmax())
            rows.append(
                {
                    "label": labels[best],
                    "score": float(probs[best]),
                    "probs": {name: float(p) for name, p in zip(labels, probs)},
                }
            )
        return JSONResponse({"predictions": rows, "backend": self.engine.backend})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "backend": self.engine.backend, "queued_texts": self.batcher.queued})

    async def metrics_text(self, request: Request) -> Response:
        self.token.check(request.headers.get("authorization"))
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def model(self, request: Request) -> Response:
        self.token.check(request.headers.get("authorization"))
        window = self.engine.window
        drift = None
        if window is not None:
            drift = {"window": window.window, "min_window": window.min_window, "psi_alert": window.threshold}
        return JSONResponse({**self.engine.info, "drift": drift, "limits": asdict(self.config.limits)})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` bytes, whatever Content-Length said.

    An oversized body is still read to its end (and dropped, never held) up to `DRAIN_BYTES`, so
    the client, which is still sending, gets the 413 instead of a broken pipe; a bigger one is
    refused at once by `check_length_header` and its connection closed.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if size > limit:
        amount = f"{size}" if size <= DRAIN_BYTES else f"more than {DRAIN_BYTES}"
        raise Refused(413, "body_too_large", f"body of {amount} bytes > limit {limit}")
    return b"".join(chunks)


class Observed:
    """ASGI middleware: every HTTP request's count, status and latency in the metrics.

    Starlette's handlers (`create_app`) have already answered a refusal or a failure by the time an
    exception reaches here; a failure Starlette re-raises after its 500 is swallowed (its traceback
    was logged once, with the reference the client got).
    """

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            if not status["sent"]:
                await error(500, "internal error (see the server log)")(scope, receive, send_observed)
        finally:
            metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)


def _handlers(service: Service) -> dict[Any, Any]:
    """Refused -> its status and one-line reason; HTTP errors (404, 405) as JSON; anything else a 500."""

    async def refused(request: Request, exc: Refused) -> Response:
        service.metrics.errors.labels(kind=exc.kind).inc()
        response = error(exc.status, exc.reason)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    async def failed(request: Request, exc: Exception) -> Response:
        ref = uuid.uuid4().hex[:12]
        log.error("internal error (ref %s) on %s", ref, request.url.path, exc_info=exc)
        service.metrics.errors.labels(kind="internal").inc()
        return error(500, f"internal error (ref {ref}; see the server log)")

    return {Refused: refused, HTTPException: http_error, Exception: failed}


def create_app(config: ServeConfig, engine: Engine | None = None) -> Any:
    """The ASGI app: Starlette routes wrapped in the `Observed` middleware."""
    service = Service(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.batcher.start()
        log.info(
            "serving %s on %s (max batch %d, wait %.1f ms, token %s)",
            config.model,
            service.engine.backend,
            config.max_batch,
            config.batch_wait_ms,
            "required" if service.token.required else "off",
        )
        yield
        await service.batcher.stop()

    routes = [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
        Route("/model", service.model, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=_handlers(service))
    app.state.service = service
    observed = Observed(app, service)
    observed.state = app.state  # type: ignore[attr-defined]
    return observed


def create_app_from_env() -> Any:
    """uvicorn's factory in each worker process (`lmpipe serve --workers N`)."""
    return create_app(ServeConfig.from_env())
