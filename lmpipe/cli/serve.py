"""`lmpipe serve`: the exported model over HTTP; `lmpipe monitor`: its metrics, readable.

    lmpipe serve                                   # models/export on 127.0.0.1:8000, backend measured here
    LMPIPE_SERVE_TOKEN=s3cret lmpipe serve --workers 2 --backend onnx-int8
    lmpipe monitor http://127.0.0.1:8000 --watch 10

The service itself is lmpipe.serve.app; heavy packages are imported inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from lmpipe.core.errors import LmpipeError

DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(args: argparse.Namespace) -> int:
    # Before torch loads: OpenMP threads that spin while they wait collapse when the event loop or
    # another process takes a core (a batch-1 call measured 3 ms idle, 240 ms beside a busy core,
    # 6-9 ms with PASSIVE). A server shares its cores with its own HTTP handling: sleep, not spin.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    import uvicorn

    from lmpipe.serve.app import CONFIG_ENV, ServeConfig, create_app
    from lmpipe.serve.guard import TOKEN_ENV, Limits

    for flag in ("workers", "max_batch", "max_queue", "max_body_bytes", "max_texts", "max_chars"):
        if getattr(args, flag) < 1:
            raise LmpipeError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.batch_wait_ms < 0:
        raise LmpipeError(f"--batch-wait-ms must be >= 0 (got {args.batch_wait_ms})")
    drift = {"window": args.drift_window, "min_window": args.drift_min_window, "threshold": args.psi_alert}
    config = ServeConfig(
        model=args.model,
        backend=args.backend,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.workers),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        limits=Limits(args.max_body_bytes, args.max_texts, args.max_chars),
        log_inputs=args.log_inputs,
        drift={k: v for k, v in drift.items() if v},
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK and not os.environ.get(TOKEN_ENV):
        logging.getLogger("lmpipe.serve").warning(
            "listening on %s without %s: anyone who reaches this port can use the model", args.host, TOKEN_ENV
        )
    options = {"host": args.host, "port": args.port, "log_config": None, "access_log": args.access_log}
    if args.workers == 1:
        uvicorn.run(create_app(config), **options)
        return 0
    if config.backend == "auto":  # measured once here, so every worker runs the same backend
        from pathlib import Path

        from lmpipe.serve.engine import choose_backend, load_reference, median_tokens

        model = Path(config.model)
        tokens = median_tokens(load_reference(model))
        config.backend, _ = choose_backend(model, config.threads, config.max_batch, tokens)
    os.environ[CONFIG_ENV] = config.to_env()
    with tempfile.TemporaryDirectory(prefix="lmpipe-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # every worker's metrics, summed on scrape
        uvicorn.run("lmpipe.serve.app:create_app_from_env", factory=True, workers=args.workers, **options)
    return 0


def add_serve_parser(subparsers: Any) -> None:
    from lmpipe.cli.predict import DEFAULT_MODEL
    from lmpipe.inference.predictor import BACKENDS

    parser = subparsers.add_parser(
        "serve",
        help="serve the exported model over HTTP (predict, health, metrics, model lineage)",
        description="Serve the exported classifier: POST /predict, GET /health, /metrics (Prometheus), /model "
        "(lineage). Set LMPIPE_SERVE_TOKEN to require `Authorization: Bearer <token>`. Concurrent requests are "
        "micro-batched; live inputs are compared with the training split (drift.json) and alerts logged.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"export folder (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="inference engine; auto = the fastest on this machine, measured at start (default: auto)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its model (default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per worker (default: cores / workers)")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="texts per model call across requests; 1 = one at a time (32)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a lone request waits for company (default: 2)"
    )
    parser.add_argument("--max-queue", type=int, default=1024, help="queued texts before 503 (default: 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default: 1 MiB)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request (default: 64)")
    parser.add_argument("--max-chars", type=int, default=20_000, help="characters per text (default: 20000)")
    parser.add_argument("--log-inputs", action="store_true", help="log every input text, digits and e-mails masked")
    parser.add_argument("--drift-window", type=int, help="texts in the drift window (default: drift.json's)")
    parser.add_argument("--drift-min-window", type=int, help="texts before the first PSI (default: drift.json's)")
    parser.add_argument("--psi-alert", type=float, help="PSI alert threshold (default: drift.json's)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=serve_command)

    monitor = subparsers.add_parser(
        "monitor",
        help="print a served model's metrics readable (requests, errors, latency, classes, drift)",
        description="Scrape URL/metrics (with LMPIPE_SERVE_TOKEN when set) and print it readable.",
    )
    monitor.add_argument("url", nargs="?", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="the server's base URL")
    monitor.add_argument("--watch", type=float, metavar="SECONDS", help="scrape again every SECONDS until Ctrl-C")
    monitor.set_defaults(func=monitor_command)


# --------------------------------------------------------------------------- monitor
def scrape(url: str, timeout: float = 10.0) -> str:
    """The /metrics text of the server at `url`; errors name the URL and the HTTP status."""
    from lmpipe.serve.guard import TOKEN_ENV

    request = urllib.request.Request(url.rstrip("/") + "/metrics")
    if os.environ.get(TOKEN_ENV):
        request.add_header("Authorization", f"Bearer {os.environ[TOKEN_ENV]}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise LmpipeError(f"{url}/metrics: HTTP {exc.code} ({exc.read().decode('utf-8', 'replace')[:200]})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LmpipeError(f"{url}/metrics: not reachable ({getattr(exc, 'reason', exc)})") from None


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample, parsed by the official Prometheus parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float:
    """histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    rows = sorted(buckets)
    total = rows[-1][1] if rows else 0
    if total == 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in rows:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


def summarize(text: str) -> str:
    """The readable report of one scrape."""
    from lmpipe.monitor.drift import level

    found = samples(text)

    def pick(name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for n, lab, v in found if n == name and all(lab.get(k) == w for k, w in labels.items())]

    lines = []
    for labels, _ in pick("lmpipe_model_info"):
        lines.append(f"model      backend {labels['backend']}, revision {labels['revision'][:12]}, md5 {labels['md5']}")
    by_status: dict[str, float] = {}
    for labels, value in pick("lmpipe_requests_total", endpoint="/predict"):
        by_status[labels["status"]] = by_status.get(labels["status"], 0) + value
    total = sum(by_status.values())
    statuses = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
    lines.append(f"predict    {total:.0f} requests ({statuses or 'none yet'})")
    errors = [f"{lab['kind']} {v:.0f}" for lab, v in pick("lmpipe_request_errors_total") if v]
    lines.append(f"errors     {', '.join(errors) or 'none'}")
    buckets = [(float(lab["le"]), v) for lab, v in pick("lmpipe_request_latency_seconds_bucket", endpoint="/predict")]
    if buckets and max(v for _, v in buckets) > 0:
        figures = ", ".join(f"p{int(q * 100)} {quantile(buckets, q) * 1000:.1f} ms" for q in (0.5, 0.95, 0.99))
        lines.append(f"latency    {figures} (from histogram buckets)")
    batches = dict((n, v) for n, _, v in found if n in ("lmpipe_batch_size_sum", "lmpipe_batch_size_count"))
    if batches.get("lmpipe_batch_size_count"):
        calls = batches["lmpipe_batch_size_count"]
        lines.append(f"batches    {calls:.0f} model calls, {batches['lmpipe_batch_size_sum'] / calls:.1f} texts each")
    classes = pick("lmpipe_predictions_total")
    counted = sum(v for _, v in classes)
    if counted:
        shares = ", ".join(f"{lab['label']} {v / counted:.1%}" for lab, v in classes)
        lines.append(f"classes    {shares} of {counted:.0f} texts")
    window = pick("lmpipe_drift_window_texts")
    threshold = pick("lmpipe_drift_threshold")
    psi = pick("lmpipe_drift_psi")
    if window:
        alert = threshold[0][1] if threshold else float("nan")
        lines.append(f"drift      window {window[0][1]:.0f} texts, alert above PSI {alert:g}")
        alerts = {lab["statistic"]: v for lab, v in pick("lmpipe_drift_alerts_total")}
        for labels, value in psi:
            name = labels["statistic"]
            flag = "ALERT" if value > alert else "ok"
            count = alerts.get(name, 0)
            lines.append(f"  {name:<8} PSI {value:.3f} ({level(value)}) {flag}; {count:.0f} alert(s) so far")
        if not psi:
            lines.append("  no PSI yet: the window is still filling")
    return "\n".join(lines)


def monitor_command(args: argparse.Namespace) -> int:
    while True:
        print(summarize(scrape(args.url)))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)
        print()
