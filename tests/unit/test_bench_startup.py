"""bench.startup: every side runs the real stages in a scratch project, and both code versions agree.

No timing threshold: the checks are that each side runs fetch -> preprocess -> baseline through
the real stage modules (ours, and the revision before the background tracker), that the start of
the work is seen before the process ends, and that both versions write the same bytes.
"""

from __future__ import annotations

from bench import startup


def test_startup_sides_run_the_stages_and_write_the_same_bytes():
    config = startup.default_config(quick=True)
    results = {side: startup.run_side(side, config) for side in startup.SIDES}
    for side in ("ours", "before"):
        r = results[side]
        assert list(r["startup_s"]) == list(startup.STAGES), side
        assert all(0 < r["startup_s"][s] <= r["wall_s"][s] for s in startup.STAGES), side
    assert results["ours"]["outputs"] == results["before"]["outputs"]
    assert all(md5 for md5 in results["ours"]["outputs"].values())
    assert 0 < results["floor"]["startup_s"]["floor"] <= results["floor"]["wall_s"]["floor"]
