"""Wall-clock timing shared by the benchmarks: warm up once, then the median of a few runs."""

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA kernels (a no-op on CPU), so that a clock reading counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    step: Callable[[], object],
    repeats: int,
    device: torch.device,
    *,
    min_total_seconds: float = 0.0,
    max_repeats: int = 100,
) -> float:
    """Median wall-clock seconds of ``step()`` over ``repeats`` runs after one warm-up run.

    With ``min_total_seconds``, a fast step runs more often (up to ``max_repeats`` times) until
    the timed runs add up to that long: the median of three 20 ms runs moves with whatever else
    the machine did in that tenth of a second, the median of fifty barely does.
    On CUDA the device is synchronised around each run, so queued kernels are counted.
    """

    step()
    times = []
    while len(times) < repeats or (
        sum(times) < min_total_seconds and len(times) < max(repeats, max_repeats)
    ):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side_seconds(
    steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns ``repeats`` times after one warm-up
    run each: a slow spell of a shared machine slows them all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine_description(device: torch.device) -> str:
    """A short description of where a benchmark ran, for the saved result tables."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (PyTorch {torch.__version__})"
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({cpu_model()}), PyTorch {torch.__version__}"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name and architecture: ``"AMD EPYC 9454P, x86_64"``.

    Two machines of one architecture can differ several-fold in speed, and their matrix
    kernels round differently, so a saved table names the model (from Linux's ``cpuinfo``);
    elsewhere, or when it has no model line, only ``platform``'s processor or architecture.
    """
    import platform

    architecture = platform.machine() or platform.processor()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return f"{' '.join(value.split())}, {architecture}"
    except OSError:
        pass
    return platform.processor() or architecture
