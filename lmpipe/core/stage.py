"""What every `python -m stages.NAME` shares: the entry guard, the start-up clock and the torch set-up.

Start-up is the time from the process's start (as the kernel records it) to the moment the
stage's work begins, i.e. the body of `lmpipe.core.tracking.stage_run`: interpreter, imports,
params, input checks. `work_started` logs it; the tracker records it as `startup_seconds`.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from lmpipe.core.errors import LmpipeError, Terminated
from lmpipe.core.io import user_error

log = logging.getLogger("lmpipe.core.stage")


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat field 22, 10 ms ticks); None elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def work_started(stage: str) -> float | None:
    """Log how long this process took to start working on `stage`; return those seconds."""
    age = process_age()
    if age is not None:
        log.info("%s: work starts %.2f s after process start", stage, age)
    return age


def run(main: Callable[[], Any]) -> None:
    """Run a stage's main(): a user error prints one line and exits 2; a kill exits 143/130.

    A full disk (ENOSPC, EDQUOT, EFBIG), a folder where a file should be and a permission error are
    user errors too, wherever they happen (lmpipe.core.io.user_error).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (LmpipeError, OSError) as exc:
        error = exc if isinstance(exc, LmpipeError) else user_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Terminated as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("stopped: interrupted", file=sys.stderr)
        sys.exit(130)


def setup_torch(seed: int, threads: int, device: str = "auto") -> Any:
    """Seed every generator, fix the thread count, turn on deterministic kernels; return the device."""

    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LmpipeError("params.yaml: base.device is 'cuda' but no CUDA device is available")
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its attention backward is not deterministic
    return torch.device(device)
