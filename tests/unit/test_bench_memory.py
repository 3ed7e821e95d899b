"""bench.memory: each side runs the real tokenize / preprocess work on its 1x or 2x input.

No memory threshold here (bench reports, never asserts): the checks are that the inputs double
as described (the same text twice has exactly twice the documents and tokens) and that each
side reports a peak no lower than its RSS before the work.
"""

from __future__ import annotations

from bench import memory


def test_memory_sides_run_the_work_on_inputs_that_double(tmp_path):
    config = {**memory.default_config(quick=True), "inputs": str(tmp_path)}
    memory.prepare_inputs(config, tmp_path)
    r = {side: memory.run_side(side, config) for side in memory.SIDES}
    assert all(x["peak_rss_mb"] >= x["rss_before_work_mb"] > 0 for x in r.values())
    assert r["tokenize-2x-same"]["documents"] == 2 * r["tokenize-2x"]["documents"]
    assert r["tokenize-2x-same"]["tokens"] == 2 * r["tokenize-2x"]["tokens"]
    assert 0 < r["tokenize-1x"]["documents"] < r["tokenize-2x"]["documents"]
    assert 0 < r["preprocess-1x"]["documents"] < r["preprocess-2x"]["documents"]
