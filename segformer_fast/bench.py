"""Shared by the demo, ``python -m segformer_fast bench`` and benchmarks/: building SegFormers of
each variant in each ecosystem, and timing that is fair on a noisy shared machine (interleaved
runs in one process, compared as median ratios, never as absolute times across runs)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .models.segformer import VARIANTS


def hf_config(variant: str, num_labels: int = 150, **kw):
    from transformers import SegformerConfig

    dims, depths, decoder = VARIANTS[variant.lower()]
    return SegformerConfig(hidden_sizes=dims, depths=depths, decoder_hidden_size=decoder,
                           num_labels=num_labels, **kw)


def hf_segformer(variant: str = "b0", num_labels: int = 150, seed: int = 0, realistic: bool = True):
    """A Hugging Face SegformerForSemanticSegmentation of ``variant`` (random weights, seeded, at
    trained scale when ``realistic``), in eval mode, with the default (SDPA) attention."""
    from transformers import SegformerForSemanticSegmentation

    from .testing import init_realistic_

    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(hf_config(variant, num_labels))
    if realistic:
        init_realistic_(model, seed=seed)
    return model.eval()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1,
                device: str = "cpu", progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time each callable ``rounds`` times, interleaved (a, b, c, a, b, c, ...) so slow phases of
    a shared machine hit every contender alike. Returns seconds per call, per name."""
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        if progress:
            progress(f"round {r + 1}/{warmup + rounds}")
    return times


def median_ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of (time of ``slow`` / time of ``fast``) — each ratio taken within one
    round, so machine-wide slowdowns cancel."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def versions() -> dict:
    """Device and library versions, recorded with every benchmark row."""
    import platform
    import sys

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
            "processor": platform.processor(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info
