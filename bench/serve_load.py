"""HTTP serving under load: `lmpipe serve` (micro-batching on and off) against `mlflow models serve`.

Every side is a real server, a fresh subprocess in its own process group on 127.0.0.1 (always
killed at the end, its whole group), driven by a load generator in another process (the side
process of `bench.common.run_child`, so the client never shares the server's GIL): Python asyncio,
keep-alive HTTP/1.1 connections on raw streams, each connection sending its next request as soon
as the previous one is answered.

Sides (each a fresh server, interleaved `repeats` rounds):
- `lmpipe_torch`: `lmpipe serve --backend torch`, micro-batching on (`--max-batch 32`, the default).
- `lmpipe_torch_b1`: `lmpipe serve --backend torch --max-batch 1`: one request per model call.
- `mlflow`: `mlflow models serve -m models:/lmpipe-classifier/latest --env-manager local` (FastAPI
  on uvicorn, one `predict` per request); its pyfunc runs the same model on torch, so
  `lmpipe_torch` against it is the same-engine comparison.
- `lmpipe_auto`: `lmpipe serve --backend auto` (what a user gets: the backend measured at start).
- `soak` (once, after the rounds): `lmpipe serve --backend auto` for `soak_s` seconds at
  concurrency 8 with a fixed mix (70 % one review, 20 % lists of 4, 10 % invalid bodies that must
  be answered 422); the server's RSS (VmRSS summed over its process group) every `rss_every_s`.

Each cell (side x concurrency 1, 8, 32): a warm-up of `warmup_per_connection` requests on every
connection, then `requests` requests or `time_cap_s` seconds, whichever comes first. One real
review per request, from a seeded sample of data/processed/test.parquet's `text` column, cycled
in the same order on every side. Reported: requests/s, p50/p95/p99 latency over every measured
request, non-200 answers and failed connections (errors), and for lmpipe the mean texts per model
call (from /metrics). Both torch sides must label the first `probe` reviews alike (same model).

Issue criterion: micro-batching at concurrency 32 gives >= 2x the requests/s of one-at-a-time
serving of the same model. The report states whether it holds; nothing here asserts it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import common

MODULE = "bench.serve_load"
SIDES = ("lmpipe_torch", "lmpipe_torch_b1", "mlflow", "lmpipe_auto")
SOAK = "soak"
LABELS = {
    "lmpipe_torch": "lmpipe serve --backend torch (micro-batching, max batch 32)",
    "lmpipe_torch_b1": "lmpipe serve --backend torch --max-batch 1 (one at a time)",
    "mlflow": "mlflow models serve (torch pyfunc, one predict per request)",
    "lmpipe_auto": "lmpipe serve --backend auto (micro-batching)",
}
REGISTERED = "models:/lmpipe-classifier/latest"
TEST_SPLIT = Path("data/processed/test.parquet")
HOST = "127.0.0.1"
START_TIMEOUT_S = 300  # torch + transformers (+ mlflow) imports and the auto backend's timings on loaded cores
REQUEST_TIMEOUT_S = 120
CRITERION = 2.0  # micro-batching / one-at-a-time requests/s at concurrency 32, the issue's bar
RSS_BOUND_MB = 64.0  # soak: RSS growth after warm-up above this is reported as a leak suspect
SOAK_MIX = (1, 1, 1, 1, 1, 1, 1, 4, 4, 0)  # texts per request, cycled: 70 % one, 20 % four, 10 % invalid (0)
INVALID = (  # bodies /predict must refuse with 422 (lmpipe.serve.guard.parse_texts)
    b'{"texts": []}',
    b'{"text": "   "}',
    b'{"texts": ["fine", 3]}',
    b'{"txt": "unknown key"}',
)
# Environment of a server worth recording: threads, spinning, numerics pins, the access log.
ENV_KNOBS = (
    *common.THREAD_ENV,
    "TOKENIZERS_PARALLELISM",
    "UVICORN_ACCESS_LOG",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DYNAMIC",
    "OPENBLAS_NUM_THREADS",
)


def default_config(quick: bool = False) -> dict[str, Any]:
    return {
        "model": "models/export",
        "registered": REGISTERED,
        "concurrency": [1, 8, 32],
        "sample": 32 if quick else 256,  # distinct reviews, cycled
        "seed": 0,
        "probe": 4 if quick else 8,  # reviews sent one by one first: warm-up and the same-model check
        "warmup_per_connection": 1 if quick else 3,
        "requests": 24 if quick else 1000,  # measured per cell: 4-12 s at the 80-250 req/s seen here ...
        "time_cap_s": 5.0 if quick else 20.0,  # ... or this long, whichever comes first
        "soak_s": 10.0 if quick else 180.0,
        "soak_warmup_s": 2.0 if quick else 30.0,  # RSS growth is measured from the first sample after this
        "soak_concurrency": 8,
        "rss_every_s": 2.0 if quick else 5.0,
        "rss_bound_mb": RSS_BOUND_MB,
    }


# --------------------------------------------------------------------------- pure helpers
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}_ms": _round(percentile(latencies_ms, q)) for q in (50, 95, 99)}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, lower-cased headers) of an HTTP/1.1 response head ending in a blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def request_bytes(path: str, body: bytes, port: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def predict_body(side: str, texts: Sequence[str]) -> bytes:
    """A request for `side`: lmpipe's {"text"} / {"texts"}, MLflow's {"inputs": [...]}."""
    if side == "mlflow":
        return json.dumps({"inputs": list(texts)}).encode()
    if len(texts) == 1:
        return json.dumps({"text": texts[0]}).encode()
    return json.dumps({"texts": list(texts)}).encode()


def soak_request(texts: Sequence[str], i: int) -> tuple[bytes, int]:
    """Request `i` of the soak mix: (body, texts in it; 0 = an invalid body, 422 expected).

    The mix cycles SOAK_MIX; valid requests take the next reviews of `texts` in turn, invalid ones
    the next of INVALID, so the sequence is the same on every run."""
    cycle, at = divmod(i, len(SOAK_MIX))
    size = SOAK_MIX[at]
    if size == 0:
        bad_per_cycle = SOAK_MIX.count(0)
        return INVALID[(cycle * bad_per_cycle + SOAK_MIX[:at].count(0)) % len(INVALID)], 0
    first = cycle * sum(SOAK_MIX) + sum(SOAK_MIX[:at])
    return predict_body("lmpipe", [texts[(first + k) % len(texts)] for k in range(size)]), size


def metric_totals(text: str) -> dict[str, float]:
    """From a /metrics scrape: /predict requests by status, texts, model calls and texts per call."""
    from lmpipe.cli.serve import samples

    out: dict[str, float] = {"requests_total": 0.0, "batch_sum": 0.0, "batch_count": 0.0, "texts_total": 0.0}
    for name, labels, value in samples(text):
        if name == "lmpipe_requests_total" and labels.get("endpoint") == "/predict":
            out["requests_total"] += value
            out[f"requests_{labels['status']}"] = out.get(f"requests_{labels['status']}", 0.0) + value
        elif name == "lmpipe_batch_size_sum":
            out["batch_sum"] += value
        elif name == "lmpipe_batch_size_count":
            out["batch_count"] += value
        elif name == "lmpipe_texts_total":
            out["texts_total"] += value
    return out


def mean_batch(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Texts per model call between two scrapes."""
    if not before or not after:
        return None
    calls = after["batch_count"] - before["batch_count"]
    return round((after["batch_sum"] - before["batch_sum"]) / calls, 2) if calls else None


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; `align` per column: 'l' left, anything else right (numbers)."""

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        return str(value)

    marks = ["---" if (align[i : i + 1] or "r") == "l" else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return lines


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server (before exec): SIGTERM when the load generator dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def server_command(side: str, config: dict[str, Any], port: int) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, readiness path) of `side`'s server."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    # lmpipe serve sets OMP_WAIT_POLICY=PASSIVE itself unless set; the peer gets the same, so a
    # spinning OpenMP pool (3 ms -> 240 ms per call beside a busy core) handicaps neither side.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if side == "mlflow":
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{common.ROOT / 'mlflow.db'}")
        env["UVICORN_ACCESS_LOG"] = "false"  # as lmpipe's --no-access-log: no log line per request
        argv = [str(bin_dir / "mlflow"), "models", "serve", "-m", config["registered"], "--env-manager", "local"]
        argv += ["--host", HOST, "--port", str(port), "--workers", "1"]
        return argv, env, "/ping"
    backend = "auto" if side in ("lmpipe_auto", SOAK) else "torch"
    argv = [str(bin_dir / "lmpipe"), "serve", "--model", config["model"], "--backend", backend]
    argv += ["--host", HOST, "--port", str(port), "--no-access-log", "--log-level", "warning"]
    if side == "lmpipe_torch_b1":
        argv += ["--max-batch", "1"]
    return argv, env, "/health"


class Server:
    """A server subprocess in its own process group; `stop()` ends the whole group."""

    def __init__(self, side: str, config: dict[str, Any], log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.argv, env, self.ready_path = server_command(side, config, self.port)
        self.env = {k: env[k] for k in ENV_KNOBS if k in env}
        self.log = log_dir / f"{side}.log"
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=common.ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as response:
                    if response.status == 200:
                        return round(time.monotonic() - started, 1)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"no answer on {self.ready_path} within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def rss_mb(self) -> float:
        """VmRSS summed over the server's process group (mlflow runs uvicorn as a child)."""
        total_kb = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
            except (OSError, ValueError):
                continue  # the process ended meanwhile
        return round(total_kb / 1024.0, 1)

    def backend(self) -> str:
        """The backend the server runs (lmpipe's /health says; MLflow's pyfunc is torch)."""
        if self.ready_path != "/health":
            return "torch (MLflow pyfunc)"
        with urllib.request.urlopen(self.url + "/health", timeout=30) as response:
            return json.loads(response.read())["backend"]

    def metrics(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
                return metric_totals(response.read().decode("utf-8"))
        except (urllib.error.URLError, OSError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
        try:  # a grandchild that outlived its parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------- the load generator
class Connection:
    """One keep-alive HTTP/1.1 connection; reopened when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._exchange(path, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            if not reused:
                raise
            return await self._exchange(path, body)  # an idle keep-alive connection the server closed

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        self.writer.write(request_bytes(path, body, self.port))
        await self.writer.drain()
        status, headers = parse_head(await self.reader.readuntil(b"\r\n\r\n"))
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            data = b"".join(chunks)
        else:
            data = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(
    connections: Sequence[Connection],
    path: str,
    requests: Callable[[int], tuple[bytes, int]],
    count: int | None,
    seconds: float,
    check: Callable[[int, bytes, int], bool],
    first: int = 0,
) -> dict[str, Any]:
    """Every connection sends request `i` (a shared counter from `first`) as soon as its previous one
    is answered, until `count` were sent or `seconds` passed. `check(status, body, texts)` says
    whether an answer is the expected one. Returns latencies, statuses, errors, elapsed seconds."""
    state = {"next": first}
    stop = first + count if count is not None else None
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(conn: Connection) -> None:
        nonlocal errors
        while (stop is None or state["next"] < stop) and time.perf_counter() < deadline:
            body, texts = requests(state["next"])
            state["next"] += 1
            t0 = time.perf_counter()
            try:
                status, data = await asyncio.wait_for(conn.post(path, body), REQUEST_TIMEOUT_S)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                conn.close()
                status, data = 0, b""
            latencies.append((time.perf_counter() - t0) * 1000.0)
            statuses[str(status)] += 1
            if not check(status, data, texts):
                errors += 1

    await asyncio.gather(*(worker(c) for c in connections))
    return {
        "latencies_ms": latencies,
        "statuses": dict(statuses),
        "errors": errors,
        "seconds": time.perf_counter() - started,
        "next": state["next"],
    }


def ok_200(status: int, body: bytes, texts: int) -> bool:
    return status == 200


def run_cell(server: Server, side: str, bodies: Sequence[bytes], concurrency: int, config: dict[str, Any]) -> dict:
    """One concurrency level against a running server: warm-up, then the measured requests."""
    path = "/invocations" if side == "mlflow" else "/predict"

    def request(i: int) -> tuple[bytes, int]:
        return bodies[i % len(bodies)], 1

    async def cell() -> dict[str, Any]:
        connections = [Connection(server.port) for _ in range(concurrency)]
        try:
            warm = await drive(connections, path, request, concurrency * config["warmup_per_connection"], 600.0, ok_200)
            before = server.metrics() if side != "mlflow" else None
            measured = await drive(
                connections, path, request, config["requests"], config["time_cap_s"], ok_200, first=warm["next"]
            )
            after = server.metrics() if side != "mlflow" else None
        finally:
            for conn in connections:
                conn.close()
        n = len(measured["latencies_ms"])
        return {
            "concurrency": concurrency,
            "requests": n,
            "requests_per_s": round(n / measured["seconds"], 2) if measured["seconds"] else 0.0,
            "seconds": round(measured["seconds"], 2),
            **latency_summary(measured["latencies_ms"]),
            "errors": measured["errors"],
            "statuses": measured["statuses"],
            "warmup_errors": warm["errors"],
            "mean_batch": mean_batch(before, after),
            "latencies_ms": [round(x, 3) for x in measured["latencies_ms"]],
        }

    return asyncio.run(cell())


def probe(server: Server, side: str, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Each of `texts` alone, in turn: (label, score) as the server answers (also a warm-up)."""
    path = "/invocations" if side == "mlflow" else "/predict"

    async def ask() -> list[dict[str, Any]]:
        conn, out = Connection(server.port), []
        try:
            for text in texts:
                status, data = await asyncio.wait_for(conn.post(path, predict_body(side, [text])), REQUEST_TIMEOUT_S)
                if status != 200:
                    raise RuntimeError(f"{side}: {path} answered {status}: {data[:300]!r}")
                row = json.loads(data)["predictions"][0]
                out.append({"label": row["label"], "score": round(float(row["score"]), 6)})
        finally:
            conn.close()
        return out

    return asyncio.run(ask())


def sample_texts(config: dict[str, Any]) -> list[str]:
    """`sample` reviews of the test split, seeded; the same list in the same order on every side."""
    import pandas as pd

    path = common.ROOT / TEST_SPLIT
    if not path.is_file():
        raise FileNotFoundError(f"{TEST_SPLIT} not found: run `dvc repro preprocess` first")
    texts = pd.read_parquet(path, columns=["text"])["text"].astype(str).tolist()
    return random.Random(config["seed"]).sample(texts, min(config["sample"], len(texts)))


# --------------------------------------------------------------------------- one side per process
def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    texts = sample_texts(config)
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-serve-") as tmp:
        server = Server(side, config, Path(tmp))
        try:
            startup_s = server.wait_ready()
            backend = server.backend()
            if side == SOAK:
                result = soak(server, texts, config)
            else:
                result = {"probe": probe(server, side, texts[: config["probe"]]), "cells": {}}
                bodies = [predict_body(side, [t]) for t in texts]
                for c in config["concurrency"]:
                    result["cells"][str(c)] = run_cell(server, side, bodies, c, config)
                result["rss_end_mb"] = server.rss_mb()
            if side != "mlflow":
                result["metrics_end"] = server.metrics()
        except BaseException:
            common.log(f"{side}: server log tail:\n{server.tail()}")
            raise
        finally:
            server.stop()
    cells = result.get("cells", {})
    summary = ", ".join(f"c{c} {r['requests_per_s']:.1f} req/s" for c, r in cells.items()) or result.get("summary")
    result.update(
        side=side,
        command=" ".join(server.argv),
        backend=backend,
        server_env=server.env,
        startup_s=startup_s,
        load_before_side=load_before,
        load_after_side=common.load_average(),
        summary=f"{summary} (started in {startup_s} s)",
    )
    return result


def soak(server: Server, texts: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    """`soak_s` seconds of the mixed load at `soak_concurrency`; RSS sampled every `rss_every_s`."""
    samples: list[tuple[float, float]] = []

    def request(i: int) -> tuple[bytes, int]:
        return soak_request(texts, i)

    def check(status: int, body: bytes, n: int) -> bool:
        if n == 0:
            return status == 422
        try:
            return status == 200 and len(json.loads(body)["predictions"]) == n
        except (ValueError, KeyError, TypeError):
            return False

    async def run() -> dict[str, Any]:
        connections = [Connection(server.port) for _ in range(config["soak_concurrency"])]
        started = time.perf_counter()

        async def sample_rss() -> None:
            while True:
                samples.append((round(time.perf_counter() - started, 1), server.rss_mb()))
                await asyncio.sleep(config["rss_every_s"])

        sampler = asyncio.create_task(sample_rss())
        try:
            load = await drive(connections, "/predict", request, None, config["soak_s"], check)
        finally:
            sampler.cancel()
            for conn in connections:
                conn.close()
        samples.append((round(time.perf_counter() - started, 1), server.rss_mb()))
        return load

    load = asyncio.run(run())
    after_warmup = next((rss for t, rss in samples if t >= config["soak_warmup_s"]), samples[-1][1])
    end = samples[-1][1]
    growth = round(end - after_warmup, 1)
    sent = [SOAK_MIX[i % len(SOAK_MIX)] for i in range(load["next"])]
    return {
        "requests": len(load["latencies_ms"]),
        "requests_per_s": round(len(load["latencies_ms"]) / load["seconds"], 2),
        "seconds": round(load["seconds"], 1),
        "mix": {
            "one": sum(1 for n in sent if n == 1),
            "four": sum(1 for n in sent if n == 4),
            "invalid": sum(1 for n in sent if n == 0),
        },
        "texts_sent": sum(sent),
        "statuses": load["statuses"],
        "errors": load["errors"],
        **latency_summary(load["latencies_ms"]),
        "rss_samples": samples,
        "rss_after_warmup_mb": after_warmup,
        "rss_end_mb": end,
        "rss_growth_mb": growth,
        "rss_bound_mb": config["rss_bound_mb"],
        "rss_within_bound": growth <= config["rss_bound_mb"],
        "summary": f"soak {load['seconds']:.0f} s, {load['errors']} errors, RSS +{growth} MB",
    }


# --------------------------------------------------------------------------- the orchestrator
def aggregate(runs: dict[str, list[dict[str, Any]]], concurrency: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per side and concurrency: median requests/s over rounds; percentiles over every latency."""
    out: dict[str, dict[str, Any]] = {}
    for side, rounds in runs.items():
        out[side] = {}
        for c in concurrency:
            cells = [r["cells"][str(c)] for r in rounds]
            latencies = [x for cell in cells for x in cell["latencies_ms"]]
            batches = [cell["mean_batch"] for cell in cells if cell.get("mean_batch") is not None]
            out[side][str(c)] = {
                "requests_per_s": round(common.median([cell["requests_per_s"] for cell in cells]), 2),
                "requests": sum(cell["requests"] for cell in cells),
                **latency_summary(latencies),
                "errors": sum(cell["errors"] for cell in cells),
                "mean_batch": round(common.median(batches), 2) if batches else None,
            }
    return out


def same_model(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Labels and scores of the probe reviews: every side against lmpipe_torch's first round."""
    reference = runs["lmpipe_torch"][0]["probe"]
    out = {}
    for side, rounds in runs.items():
        answers = rounds[0]["probe"]
        out[side] = {
            "labels_agree": sum(a["label"] == b["label"] for a, b in zip(answers, reference)),
            "of": len(reference),
            "max_score_diff": round(max(abs(a["score"] - b["score"]) for a, b in zip(answers, reference)), 6),
        }
    return out


def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs = common.interleave(MODULE, SIDES, config, repeats, common.log)
    soak_run = common.run_child(MODULE, SOAK, config, timeout=config["soak_s"] + 900)
    common.log(f"  serve_load {SOAK}: {soak_run['summary']}")
    table = aggregate(runs, config["concurrency"])
    ratios: dict[str, dict[str, float | None]] = {"batching_vs_one_at_a_time": {}, "lmpipe_vs_mlflow": {}}
    for c in map(str, config["concurrency"]):
        rps = {side: table[side][c]["requests_per_s"] for side in SIDES}
        ratios["batching_vs_one_at_a_time"][c] = common.ratio(rps["lmpipe_torch"], rps["lmpipe_torch_b1"])
        ratios["lmpipe_vs_mlflow"][c] = common.ratio(rps["lmpipe_torch"], rps["mlflow"])
    top = str(max(config["concurrency"]))
    achieved = ratios["batching_vs_one_at_a_time"][top]
    result = {
        "benchmark": "serve_load",
        "description": (
            f"real servers on 127.0.0.1, model {config['model']} (mlflow: {config['registered']}); asyncio "
            f"keep-alive client in its own process; {config['requests']} requests or {config['time_cap_s']:g} s per "
            f"cell; soak {config['soak_s']:g} s at concurrency {config['soak_concurrency']}; every cell and the soak: "
            "`python -m bench.serve_load` -> bench/serve_load.md"
        ),
        "revision": _revision(),
        "machine": {**common.machine_facts(), "serving_versions": _versions()},
        "table": table,
        "ratios": ratios,
        "criterion": {
            "what": f"micro-batching / one-at-a-time requests/s at concurrency {top} >= {CRITERION:g}",
            "ratio": achieved,
            "holds": achieved is not None and achieved >= CRITERION,
        },
        "same_model": same_model(runs),
        "soak": soak_run,
        "runs": runs,
    }
    result["rows"] = rows(result, config)
    return result


def rows(result: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """bench.run's table: the ratios that answer the issue, ours / peer."""
    table, out = result["table"], []
    for c in map(str, config["concurrency"]):
        batching, single = table["lmpipe_torch"][c], table["lmpipe_torch_b1"][c]
        note = f"mean batch {batching['mean_batch']}"
        if c == str(max(config["concurrency"])):
            note += f"; criterion >= {CRITERION:g}: {'holds' if result['criterion']['holds'] else 'FAILS'}"
        out.append(
            common.row(
                "serve_load",
                f"requests/s at concurrency {c}, micro-batching vs one at a time",
                "lmpipe serve torch, batch 32",
                "lmpipe serve torch, --max-batch 1",
                batching["requests_per_s"],
                single["requests_per_s"],
                "req/s",
                "higher",
                note,
            )
        )
    for c in map(str, config["concurrency"]):
        ours, peer = table["lmpipe_torch"][c], table["mlflow"][c]
        out.append(
            common.row(
                "serve_load",
                f"requests/s at concurrency {c}, same model on torch",
                "lmpipe serve torch",
                "mlflow models serve",
                ours["requests_per_s"],
                peer["requests_per_s"],
                "req/s",
                "higher",
                f"p99 {ours['p99_ms']} vs {peer['p99_ms']} ms; errors {ours['errors']} vs {peer['errors']}",
            )
        )
    top = str(max(config["concurrency"]))
    auto, peer = table["lmpipe_auto"][top], table["mlflow"][top]
    out.append(
        common.row(
            "serve_load",
            f"requests/s at concurrency {top}, what a user gets",
            "lmpipe serve (backend auto)",
            "mlflow models serve",
            auto["requests_per_s"],
            peer["requests_per_s"],
            "req/s",
            "higher",
            f"backend {backends(result['runs']['lmpipe_auto'])} (measured at each start)",
        )
    )
    soak_run = result["soak"]
    out.append(
        common.row(
            "serve_load",
            f"soak {soak_run['seconds']:g} s: RSS growth after warm-up vs its bound",
            "growth",
            "bound",
            soak_run["rss_growth_mb"],
            soak_run["rss_bound_mb"],
            "MB",
            "lower",
            f"{soak_run['errors']} unexpected answers of {soak_run['requests']}",
        )
    )
    return out


def backends(rounds: Sequence[dict[str, Any]]) -> str:
    """The backend each round's server ran, in order: `onnx, onnx-int8, onnx`."""
    return ", ".join(str(r["backend"]) for r in rounds)


def _revision() -> str:
    from bench.run import git_revision

    return git_revision()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("mlflow", "starlette", "uvicorn", "fastapi"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- the report
def render_markdown(result: dict[str, Any], command: str) -> str:
    config, machine, table = result["config"], result["machine"], result["table"]
    lines = [
        "# Serving under load: lmpipe serve vs mlflow models serve",
        "",
        f"`{command}` at revision `{result['revision']}`, {result['seconds']:.0f} s in all"
        + (" (**--quick: micro counts, the figures measure nothing**)." if config.get("quick") else "."),
        f"Model `{config['model']}`; the MLflow side serves `{config['registered']}`. Each cell: "
        f"{config['warmup_per_connection']} warm-up requests per connection, then {config['requests']} requests "
        f"or {config['time_cap_s']:g} s; one review per request ({config['sample']} test reviews, seed "
        f"{config['seed']}, the same order on every side); {result['repeats']} round(s), requests/s the median "
        "of rounds, latency percentiles over every measured request.",
        "",
    ]
    header = ["side", "concurrency", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors", "texts per model call"]
    body = []
    for side in SIDES:
        for c, cell in ((str(c), table[side][str(c)]) for c in config["concurrency"]):
            body.append(
                [LABELS[side], int(c), cell["requests_per_s"], cell["p50_ms"], cell["p95_ms"], cell["p99_ms"]]
                + [cell["errors"], cell["mean_batch"]]
            )
    lines += render_table(header, body, "l")
    ratio_rows = [
        [int(c), result["ratios"]["batching_vs_one_at_a_time"][c], result["ratios"]["lmpipe_vs_mlflow"][c]]
        for c in map(str, config["concurrency"])
    ]
    lines += ["", "Ratios of requests/s:", ""]
    lines += render_table(["concurrency", "micro-batching / one at a time", "lmpipe torch / mlflow"], ratio_rows)
    crit = result["criterion"]
    lines += [
        "",
        f"**Criterion** ({crit['what']}): ratio {crit['ratio']} -> "
        f"**{'holds' if crit['holds'] else 'does NOT hold'}**.",
        "",
        "Same model: the first probe reviews, each side against `lmpipe serve --backend torch`: "
        + "; ".join(
            f"{side} {v['labels_agree']}/{v['of']} labels, max score diff {v['max_score_diff']:g}"
            for side, v in ((side, result["same_model"][side]) for side in SIDES)
        )
        + f". lmpipe auto chose `{backends(result['runs']['lmpipe_auto'])}` (per round; the soak "
        f"`{result['soak']['backend']}`).",
    ]
    s = result["soak"]
    metrics = s.get("metrics_end") or {}
    calls = metrics.get("batch_count") or 0
    lines += [
        "",
        f"## Soak: lmpipe serve --backend auto, {s['seconds']:g} s at concurrency {config['soak_concurrency']}",
        "",
        f"- {s['requests']} requests ({s['requests_per_s']:g}/s): {s['mix']['one']} single reviews, "
        f"{s['mix']['four']} lists of 4, {s['mix']['invalid']} invalid bodies (422 expected); statuses "
        f"{s['statuses']}; **{s['errors']} unexpected answers**; latency p50 {s['p50_ms']} / p99 {s['p99_ms']} ms.",
        f"- RSS (VmRSS over the server's process group, every {config['rss_every_s']:g} s): "
        f"{s['rss_after_warmup_mb']} MB after the {config['soak_warmup_s']:g} s warm-up, {s['rss_end_mb']} MB at the "
        f"end: growth {s['rss_growth_mb']} MB, bound {s['rss_bound_mb']:g} MB -> "
        f"**{'within' if s['rss_within_bound'] else 'ABOVE'}**.",
        f"- /metrics at the end: lmpipe_requests_total{{endpoint=/predict}} {metrics.get('requests_total', 0):.0f} "
        f"(the client sent {s['requests']}); "
        f"{calls:.0f} model calls, mean batch {(metrics.get('batch_sum', 0) / calls) if calls else 0:.2f} texts "
        f"({metrics.get('texts_total', 0):.0f} texts; {s['texts_sent']} valid texts sent).",
        "",
        "## Machine and environment",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores ({machine['cpus_usable']} usable)",
        f"- load average (1, 5, 15 min) at start: {', '.join(map(str, result['load_at_start']))}",
    ]
    for side in (*SIDES, SOAK):
        rounds = result["runs"][side] if side in result["runs"] else [s]
        before = ", ".join(str(r["load_before_side"][0]) for r in rounds)
        after = ", ".join(str(r["load_after_side"][0]) for r in rounds)
        lines.append(
            f"- {side} (backend {backends(rounds)}): 1-min load {before} before, {after} after; started in "
            + ", ".join(f"{r['startup_s']} s" for r in rounds)
            + "; server env "
            + ", ".join(f"{k}={v}" for k, v in rounds[0]["server_env"].items())
        )
    lines.append(
        "- Python "
        + machine["python"]
        + "; "
        + ", ".join(f"{k} {v}" for k, v in {**machine["versions"], **machine["serving_versions"]}.items() if v)
    )
    if max(result["load_at_start"][0], *(r[0]["load_before_side"][0] for r in result["runs"].values())) > (
        common.HIGH_LOAD
    ):
        lines += ["", "**Note:** the 1-minute load exceeded the core count: other work shared the cores."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help="run one side in this process (internal)")
    parser.add_argument("--config", help="JSON configuration of the side (internal)")
    parser.add_argument("--quick", action="store_true", help="micro counts: checks the code, measures nothing")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the four sides (default 1)")
    parser.add_argument("--model", help="export folder lmpipe serves (default: models/export)")
    parser.add_argument("--soak-seconds", type=float, help="soak length (default 180; --quick 10)")
    parser.add_argument("--out", help="the JSON result (default bench/serve_load.json; --quick: print only)")
    args = parser.parse_args(argv)
    if args.side:
        config = json.loads(args.config) if args.config else default_config(args.quick)
        common.emit(run_side(args.side, config), args.out)
        return 0
    config = default_config(args.quick)
    if args.model:
        config["model"] = args.model
    if args.soak_seconds:
        config["soak_s"] = args.soak_seconds
    config["quick"] = args.quick
    if not (common.ROOT / config["model"] / "hf").is_dir():
        parser.error(f"{config['model']}: not an export folder (no hf/); run `dvc repro export` or pass --model")
    command = "python -m " + MODULE + " " + " ".join(argv if argv is not None else sys.argv[1:])
    started, load = time.perf_counter(), common.load_average()
    result = orchestrate(config, args.repeats)
    result.update(
        load_at_start=load, seconds=round(time.perf_counter() - started, 1), repeats=args.repeats, config=config
    )
    text = render_markdown(result, command.strip())
    out = Path(args.out) if args.out else (None if args.quick else Path(__file__).with_name("serve_load.json"))
    if out is not None:
        out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
