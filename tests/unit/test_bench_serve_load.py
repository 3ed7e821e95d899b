"""bench.serve_load's pure helpers: percentiles, the HTTP head parser, request bodies, the soak mix,
/metrics totals and the report tables. No server starts here (the benchmark's --quick run does that)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import serve_load
from lmpipe.serve.guard import Limits, Refused, parse_texts


@pytest.mark.parametrize("q", [0, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q):
    values = [float(x) for x in np.random.default_rng(0).exponential(10.0, size=137)]
    assert serve_load.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_one_value_and_of_none():
    assert serve_load.percentile([7.0], 99) == 7.0
    assert serve_load.percentile([], 50) is None
    assert serve_load.latency_summary([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    assert serve_load.latency_summary(list(range(1, 101))) == {"p50_ms": 50.5, "p95_ms": 95.05, "p99_ms": 99.01}


def test_parse_head_reads_status_and_lower_cased_headers():
    status, headers = serve_load.parse_head(
        b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
    )
    assert status == 422 and headers == {"content-length": "12", "connection": "keep-alive"}
    with pytest.raises(ValueError, match="not an HTTP status line"):
        serve_load.parse_head(b"garbage\r\n\r\n")


def test_request_bytes_is_a_complete_keep_alive_post():
    raw = serve_load.request_bytes("/predict", b'{"text": "ok"}', 8123)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /predict HTTP/1.1\r\n") and b"Host: 127.0.0.1:8123" in head
    assert b"Content-Length: 14" in head and body == b'{"text": "ok"}'


def test_each_side_gets_its_own_request_format():
    assert json.loads(serve_load.predict_body("mlflow", ["a b"])) == {"inputs": ["a b"]}
    assert json.loads(serve_load.predict_body("lmpipe_torch", ["a b"])) == {"text": "a b"}
    assert json.loads(serve_load.predict_body("soak", ["a", "b"])) == {"texts": ["a", "b"]}


def test_soak_mix_has_the_stated_shares_and_invalid_bodies_are_refused_with_422():
    texts = [f"review {i}" for i in range(5)]
    mix = [serve_load.soak_request(texts, i) for i in range(1000)]
    sizes = [n for _, n in mix]
    assert (sizes.count(1), sizes.count(4), sizes.count(0)) == (700, 200, 100)
    assert mix == [serve_load.soak_request(texts, i) for i in range(1000)]  # the same every run
    valid = [json.loads(body) for body, n in mix if n]
    sent = [t for payload in valid for t in ([payload["text"]] if "text" in payload else payload["texts"])]
    assert sent[:15] == [texts[i % 5] for i in range(15)]  # reviews taken in turn, cycled
    for body, n in mix[:40]:
        if n == 0:
            with pytest.raises(Refused) as refused:
                parse_texts(body, Limits())
            assert refused.value.status == 422
        else:
            assert len(parse_texts(body, Limits())) == n
    assert len({body for body, n in mix if n == 0}) == len(serve_load.INVALID)


def test_metric_totals_and_mean_batch_from_a_scrape():
    text = "\n".join(
        [
            "# TYPE lmpipe_requests_total counter",
            'lmpipe_requests_total{endpoint="/predict",status="200"} 90.0',
            'lmpipe_requests_total{endpoint="/predict",status="422"} 10.0',
            'lmpipe_requests_total{endpoint="/metrics",status="200"} 3.0',
            "# TYPE lmpipe_texts_total counter",
            "lmpipe_texts_total 150.0",
            "# TYPE lmpipe_batch_size histogram",
            'lmpipe_batch_size_bucket{le="+Inf"} 30.0',
            "lmpipe_batch_size_count 30.0",
            "lmpipe_batch_size_sum 150.0",
            "",
        ]
    )
    totals = serve_load.metric_totals(text)
    assert totals["requests_total"] == 100 and totals["requests_422"] == 10 and totals["texts_total"] == 150
    before = {"batch_sum": 50.0, "batch_count": 20.0}
    assert serve_load.mean_batch(before, totals) == 10.0
    assert serve_load.mean_batch(None, totals) is None
    assert serve_load.mean_batch(totals, totals) is None  # no model call in between


def test_render_table_aligns_text_left_numbers_right_and_says_na():
    lines = serve_load.render_table(["side", "req/s", "p99 ms"], [["ours", 1234.5, None], ["peer", 3.14159, 2]], "l")
    assert lines == [
        "| side | req/s | p99 ms |",
        "| --- | ---: | ---: |",
        "| ours | 1,234.5 | n/a |",
        "| peer | 3.14 | 2 |",
    ]


def test_aggregate_takes_the_median_rate_and_pools_latencies_over_rounds():
    def cell(rate, latencies, batch):
        return {
            "cells": {
                "8": {
                    "requests_per_s": rate,
                    "requests": len(latencies),
                    "latencies_ms": latencies,
                    "errors": 1,
                    "mean_batch": batch,
                }
            }
        }

    runs = {"s": [cell(10.0, [1.0, 2.0], 4.0), cell(30.0, [3.0], None), cell(20.0, [4.0, 5.0], 6.0)]}
    table = serve_load.aggregate(runs, [8])
    assert table["s"]["8"]["requests_per_s"] == 20.0
    assert table["s"]["8"]["requests"] == 5 and table["s"]["8"]["errors"] == 3
    assert table["s"]["8"]["p50_ms"] == 3.0 and table["s"]["8"]["mean_batch"] == 5.0
