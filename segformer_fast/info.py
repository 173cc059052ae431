"""``python -m segformer_fast info``: what this machine has and what segformer_fast will run on it.

Versions (Python, torch and its CUDA, Triton, transformers, numpy, compilers), the device and its
compute capability, for every op the implementation ``auto`` picks on this device for fp32 / fp16 /
bf16 (inference and training) with every other implementation's reasons (from
``backends.which``), the native build caches (built or not, where), and the environment variables
that steer any of it. :func:`collect` returns all of it as a JSON-able dict; :func:`render` prints it.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

DTYPES = ("fp32", "fp16", "bf16")
# variables that change what runs, where builds go, or what the GPU sees
ENV_PREFIXES = ("SEGFORMER_FAST_", "TRITON_", "TORCHINDUCTOR_", "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_")
ENV_NAMES = ("CXX", "CC", "TORCH_CUDA_ARCH_LIST", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "PYTHONPATH",
             "LD_LIBRARY_PATH", "MKL_NUM_THREADS")


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _tool_version(cmd: list[str], pattern: str) -> str | None:
    """First match of ``pattern`` in ``cmd``'s output; None when the tool is missing."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"present, version unreadable ({type(e).__name__})"
    text = out.stdout + out.stderr
    m = re.search(pattern, text)
    return m.group(1) if m else (text.strip().splitlines() or ["?"])[0]


def versions() -> dict:
    """Python, libraries and compilers (None: not installed / not on PATH)."""
    import torch

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    for name in ("triton", "transformers", "numpy", "pytest", "pytest_benchmark"):
        try:
            out[name] = __import__(name).__version__
        except Exception:        # ImportError, or a package without __version__
            out[name] = None
    cxx = os.environ.get("CXX", "g++")
    out["cxx"] = f"{cxx} " + str(_tool_version([cxx, "--version"], r"(\d+\.\d+(?:\.\d+)?)"))
    out["nvcc"] = _tool_version(["nvcc", "--version"], r"release ([\d.]+)")
    out["ninja"] = _tool_version(["ninja", "--version"], r"([\d.]+)")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        out["cuda_home"] = CUDA_HOME
    except Exception as e:
        out["cuda_home"] = f"unreadable ({type(e).__name__})"
    for tool in ("ncu", "compute-sanitizer"):
        out[tool] = shutil.which(tool)
    return out


def device() -> dict:
    """The device ``auto`` serves: the first CUDA GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                "multiprocessors": p.multi_processor_count}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "capability": None,
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def dispatch(device_type: str) -> dict:
    """For every op and dtype, inference and training: what ``auto`` runs and why each other
    implementation was refused (``backends.which``; shape limits are not judged without shapes)."""
    from . import backends

    table = {}
    for op in backends.ops():
        rows = {}
        for dt in DTYPES:
            for grad in (False, True):
                c = backends.which(op, device_type, _dtype(dt), backend="auto", needs_grad=grad)
                rows[f"{dt} {'training' if grad else 'inference'}"] = {
                    "auto": c.name, "same_as": c.same_as, "error": c.error,
                    "refused": {n: r for n, r in c.reasons.items() if r}}
        table[op] = rows
    return table


def builds() -> list[dict]:
    """The native builds ``_build.load`` caches (the arguments mirror kernels/cpu.py and
    kernels/cuda.py; tests check the directories against the builds really loaded)."""
    from . import _build
    from .kernels import cpu, cuda

    specs = [("native CPU kernels", "segformer_fast_cpu", cpu.SOURCES, cpu.CFLAGS, ("-fopenmp",), ()),
             ("CUDA kernels, emulated build (CPU)", "segformer_fast_cuda_emu", cuda.EMU_SOURCES,
              cuda.EMU_CFLAGS, (), ()),
             ("CUDA kernels, GPU build (nvcc)", "segformer_fast_cuda", cuda.GPU_SOURCES, cuda.GPU_CFLAGS, (),
              cuda.GPU_CUDA_CFLAGS)]
    out = []
    for label, name, sources, cflags, ldflags, cudaflags in specs:
        try:
            where = _build.build_dir(name, tuple(sources), tuple(cflags), tuple(ldflags), tuple(cudaflags))
            built = (where / f"{name}.so").exists()
            out.append({"build": label, "name": name, "dir": str(where), "built": built,
                        "sources": list(sources)})
        except Exception as e:     # a missing source file: say so, never fail the report
            out.append({"build": label, "name": name, "dir": None, "built": False,
                        "error": f"{type(e).__name__}: {e}", "sources": list(sources)})
    return out


def environment() -> dict:
    """The environment variables in force that steer segformer_fast, Triton, torch or the GPU."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-able dict."""
    from .kernels.cuda import build_problem

    dev = device()
    cpu_cached = next(b["built"] for b in builds() if b["name"] == "segformer_fast_cpu")
    if not cpu_cached:   # which() on CPU asks whether the native CPU kernels build: say why we wait
        print("info: building the native CPU kernels once (~30 s; cached afterwards)...", file=sys.stderr,
              flush=True)
    return {"versions": versions(), "device": dev,
            "dispatch": dispatch(dev["type"]),
            "builds": builds(),
            "cuda_build_problems": {t: build_problem(t) for t in ("cuda", "cpu")},
            "environment": environment()}


def _pick(r: dict) -> str:
    return (r["auto"] or "NOTHING") + (f" (= {r['same_as']})" if r["same_as"] else "")


def render(info: dict) -> str:
    """Plain-text report of :func:`collect`'s dict."""
    v, d = info["versions"], info["device"]
    lines = ["segformer_fast info", "", "versions:"]
    lines += [f"  {k:<17} {v[k] if v[k] is not None else '-- not found'}" for k in v]
    lines += ["", "device:"]
    if d["type"] == "cuda":
        lines.append(f"  cuda: {d['name']}, compute capability {d['capability']}, {d['memory_gib']} GiB, "
                     f"{d['multiprocessors']} SMs ({d['count']} visible)")
    else:
        lines.append(f"  no CUDA device: cpu {d['name']}, {d['threads']} torch threads, {d['cores']} cores")
    lines += ["", f"dispatch on {d['type']} (backend auto; shape limits not judged without shapes):"]
    for op, rows in info["dispatch"].items():
        picks = []
        for dt in DTYPES:
            inf, train = rows[f"{dt} inference"], rows[f"{dt} training"]
            picks.append(f"{dt} {_pick(inf)} / {_pick(train)}")
        lines.append(f"  {op:<15} auto (inference / training): {', '.join(picks)}")
        refusals: dict[tuple, list[str]] = {}     # (impl, reasons) -> where they apply
        for key, r in rows.items():
            for name, why in r["refused"].items():
                refusals.setdefault((name, "; ".join(why)), []).append(key)
        for (name, why), keys in refusals.items():
            where = "" if len(keys) == len(rows) else f" [{', '.join(keys)}]"
            lines.append(f"    {name} refused{where}: {why}")
    lines += ["", "native builds (cache: SEGFORMER_FAST_BUILD_DIR or ~/.cache/segformer_fast):"]
    for b in info["builds"]:
        state = "built" if b["built"] else "not built (built on first use)"
        lines.append(f"  {b['build']:<36} {state}: {b['dir'] or b.get('error')}")
    for t, problem in info["cuda_build_problems"].items():
        lines.append(f"  CUDA kernels on {t} tensors: {problem or 'can be built here'}")
    lines += ["", "environment:"]
    env = info["environment"]
    lines += [f"  {k}={val}" for k, val in env.items()] or ["  (none of SEGFORMER_FAST_*, TRITON_*, CUDA_* ... set)"]
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The ``info`` subcommand's options."""
    p.add_argument("--json", help="also write the report as JSON here")


def main(args) -> int:
    """``python -m segformer_fast info``: print the report (exit 0)."""
    import json

    info = collect()
    print(render(info), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1, default=str)
    return 0
