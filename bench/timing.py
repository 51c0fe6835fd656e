"""Wall-clock timing shared by the benchmarks: warm up once, then the median of a few runs."""

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall-clock seconds of ``step()`` over ``repeats`` runs after one warm-up run.

    On CUDA the device is synchronised around each run, so queued kernels are counted.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
