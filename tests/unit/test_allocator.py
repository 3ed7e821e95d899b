"""lmpipe.train.allocator: freed activation-sized blocks stay mapped, so reusing them does not page-fault."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe.train import allocator

# A child process allocates eight 4 MB blocks at once and frees them, 20 times, as an eager training
# step does with its activations, and reports its minor page faults; the parent compares with and
# without the setting.
CHILD = """
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "kept":
    from lmpipe.train.allocator import keep_freed_memory
    assert keep_freed_memory()
def step():
    blocks = [np.ones(2**20, dtype=np.float32) for _ in range(8)]  # 4 MB each, written: pages touched
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def faults(mode: str) -> int:
    root = str(Path(allocator.__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", CHILD, root, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    default, kept = faults("default"), faults("kept")
    assert default > 20 * 1000  # 32 MB freed per step goes back to the kernel and faults in again
    assert kept < default / 20


def test_the_setting_is_applied_once_and_reported(monkeypatch):
    calls = []

    class Libc:
        @staticmethod
        def mallopt(option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # cached: no second round of calls
    options = {allocator.M_MMAP_THRESHOLD, allocator.M_TRIM_THRESHOLD, allocator.M_TOP_PAD}
    assert len(calls) == 3 and {option for option, _ in calls} == options


def test_a_refused_threshold_is_reported_not_raised(monkeypatch, caplog):
    class Libc:
        @staticmethod
        def mallopt(option, value):
            return 0 if option == allocator.M_MMAP_THRESHOLD else 1

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc)
    assert allocator.keep_freed_memory() is False
    assert "refused" in caplog.text
