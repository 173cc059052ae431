"""``python -m segformer_fast gpu-report --out DIR [--dry-run] [--budget-min N]``: validate and
benchmark everything on a GPU machine in one command, from a plain checkout (``PYTHONPATH=.``).

Steps, most important first, each in its own child process (a CUDA fault in one step cannot take
the others down) and each writing its JSON under DIR as soon as it finishes; ``summary.md`` is
rewritten after every step; a wall-time budget (default 25 min) cuts the running step and skips
the rest cleanly:

1. ``selfcheck``: ``info`` + ``selfcheck`` (every op x implementation vs the fp64 reference, the
   patched tiny model) -> info.json, selfcheck.json.
2. ``tests``: pytest on the contract tests with CUDA tensors (``-k cuda``: the device fixture's cuda
   cases, SegFormer-scale ``gpu`` cases included) -> tests.json, tests-junit.xml.
3. ``sanitizer``: ``compute-sanitizer`` memcheck / racecheck / synccheck around ``selfcheck --quick
   --backends cuda`` (one small case per CUDA kernel, forward and backward) -> sanitizer.json.
4. ``op_bench``: every op on every implementation at SegFormer shapes, fp16/bf16/fp32, forward and
   forward+backward: median time, effective GB/s (the fused kernel's modelled HBM bytes from
   ``segformer_fast.analysis`` / time) and % of the GPU's roofline -> op_bench.json.
5. ``model_bench``: HF SegFormer B0/B2/B5 at 512x512 and 1024x2048, batch 1 and 8, fp16/bf16/fp32:
   HF with SDPA, torch.compile (default, max-autotune), patched triton, patched cuda, patched +
   torch.compile: median latency, images/s, parity vs HF -> model_bench.json.

``--dry-run`` runs the same steps and code on CPU tensors at tiny shapes (the Triton interpreter,
the CUDA emulation; no sanitizer): it proves the runner works before a GPU is there. Its timings
are CPU numbers and are labelled so everywhere; no roofline percentage is computed for them.
The bench steps run as ``python -m segformer_fast.gpu_report bench ops|models --out DIR``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("selfcheck", "tests", "sanitizer", "op_bench", "model_bench")
# share of the whole budget a step may take at most (model_bench takes whatever is left)
# (the first selfcheck on a GPU machine also pays the nvcc build of the CUDA kernels)
STEP_CAP = {"selfcheck": 0.4, "tests": 0.3, "sanitizer": 0.15, "op_bench": 0.3, "model_bench": 1.0}
CUT = "cut (budget)"          # a step stopped by the budget: its partial results stay, not a failure
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# HBM bandwidth (bytes/s) by GPU name; the roofline constants of analysis/roofline.py are the H100's
PEAK_BYTES = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
DRY_RUN_LABEL = "CPU DRY RUN (tiny shapes, Triton interpreter, CUDA emulation): not GPU numbers"


# ---------------------------------------------------------------------------------------------
# small helpers

def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:        # a line cut by a kill
                pass
    except OSError:
        pass
    return rows


def _python_env(dry_run: bool) -> dict:
    """The children's environment: this checkout first on PYTHONPATH (no install needed); on a
    dry run (or any machine without CUDA) the interpreter and the emulation."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("SEGFORMER_FAST_CUDA_EMULATE", "1")
    return env


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` (its own process group) with stdout+stderr to ``log``; kill the group at
    ``timeout``. Returns (exit status or None on timeout, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
            f.write(f"\n[gpu-report: killed after {timeout:.0f} s: out of budget]\n")
    return rc, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the runner

class Report:
    """State of one gpu-report run: DIR, deadline, the step records (report.json)."""

    def __init__(self, out: Path, dry_run: bool, budget_min: float):
        self.out, self.dry_run = out, dry_run
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + 60 * budget_min
        self.budget_min = budget_min
        self.env = _python_env(dry_run)
        # a second run into the same DIR (e.g. --steps split over two sessions) keeps the records
        # of the steps it does not rerun
        self.steps: dict[str, dict] = (_read_json(out / "report.json") or {}).get("steps", {})

    def left(self) -> float:
        return self.deadline - time.time()

    def timeout(self, step: str) -> float:
        return min(STEP_CAP[step] * 60 * self.budget_min, self.left() - 5)

    def record(self, step: str, fresh: bool = False, **kw) -> None:
        if fresh:
            self.steps[step] = {}
        self.steps.setdefault(step, {}).update(kw)
        _write_json(self.out / "report.json", {
            "dry_run": self.dry_run, "label": DRY_RUN_LABEL if self.dry_run else None,
            "budget_min": self.budget_min, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start)),
            "elapsed_s": round(time.time() - self.start, 1), "steps": self.steps})
        (self.out / "summary.md").write_text(summary(self.out))

    def cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "segformer_fast", *args]


def step_selfcheck(r: Report) -> dict:
    log = r.logs / "selfcheck.log"
    rc_info, _ = _run(r.cli("info", "--json", str(r.out / "info.json")), log, min(120, r.timeout("selfcheck")), r.env)
    args = ["selfcheck", "--json", str(r.out / "selfcheck.json")] + (["--quick"] if r.dry_run else [])
    rc, _ = _run(r.cli(*args), log, r.timeout("selfcheck"), r.env)
    data = _read_json(r.out / "selfcheck.json") or {}
    rows = data.get("rows", [])
    return {"status": CUT if rc is None else ("ok" if rc == 0 and rc_info == 0 else "FAIL"),
            "info_exit": rc_info, "exit": rc, "passed": sum(x["status"] == "ok" for x in rows),
            "failed": sum(x["status"] == "FAIL" for x in rows), "json": ["info.json", "selfcheck.json"]}


def test_files() -> list[str]:
    """The contract tests: every op's test files, the fused modules, dispatch."""
    from . import backends

    files = set()
    for op in backends.ops():
        files.update(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob(f"test_{op}*.py"))
    files.update(f for f in ("tests/test_parts.py", "tests/test_dispatch.py") if (ROOT / f).exists())
    return sorted(files)


def parse_junit(path: Path) -> dict:
    """Counts and failures of a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"no junit XML ({type(e).__name__})"}
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
    for suite in root.iter("testsuite"):
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(suite.get(k, 0))
        out["time_s"] += float(suite.get("time", 0))
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").strip().splitlines()
            out["failed"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                  "message": msg[0][:300] if msg else ""})
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def step_tests(r: Report) -> dict:
    junit = r.out / "tests-junit.xml"
    # GPU: the cuda cases of the device fixture (SegFormer-scale "gpu" cases among them); dry run:
    # the same files and runner with the CPU cases of the stock compositions (quick)
    select = "cpu and torch_backend" if r.dry_run else "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select,
           f"--junitxml={junit}", *test_files()]
    rc, secs = _run(cmd, r.logs / "tests.log", r.timeout("tests"), r.env)
    res = parse_junit(junit)
    res.update(selection=f"-k '{select}'", files=test_files(), exit=rc, seconds=round(secs, 1))
    _write_json(r.out / "tests.json", res)
    status = CUT if rc is None else ("ok" if rc == 0 else "FAIL")
    return {"status": status, "json": ["tests.json"], "passed": res.get("passed"),
            "failed": res.get("failures", 0) + res.get("errors", 0)}


def step_sanitizer(r: Report) -> dict:
    """One small case per CUDA kernel (selfcheck --quick --backends cuda, forward and backward)
    under each compute-sanitizer tool; on a dry run the same cases without a sanitizer."""
    sanitizer = shutil.which("compute-sanitizer")
    runs = []
    tools = (None,) if r.dry_run or sanitizer is None else SANITIZER_TOOLS
    for tool in tools:
        if r.left() < 20:
            runs.append({"tool": tool, "status": "skipped (budget)"})
            continue
        name = tool or "no-sanitizer"
        case_json = r.out / f"sanitizer-{name}-cases.json"
        inner = r.cli("selfcheck", "--quick", "--backends", "cuda", "--no-model", "--dtypes", "fp32,fp16",
                      "--json", str(case_json))
        cmd = inner if tool is None else [sanitizer, "--tool", tool, "--error-exitcode", "86",
                                          "--print-limit", "100", *inner]
        log = r.logs / f"sanitizer-{name}.log"
        # no caching allocator: every tensor its own cudaMalloc, so memcheck sees out-of-bounds
        # accesses that would otherwise land inside a pooled segment
        env = {**r.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        rc, secs = _run(cmd, log, min(r.timeout("sanitizer"), r.left() - 5), env)
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        cases = (_read_json(case_json) or {}).get("rows", [])
        checked = [f"{c['op']} {c['dtype']} {'fwd+bwd' if c['backward'] else 'fwd'}" for c in cases
                   if c["status"] == "ok"]
        runs.append({"tool": tool or "none (dry run: the same cases under the CUDA emulation)",
                     "exit": rc, "seconds": round(secs, 1), "errors": int(m[-1]) if m else None,
                     "cases_ok": checked, "cases_failed": [c for c in cases if c["status"] == "FAIL"],
                     "status": CUT if rc is None else ("ok" if rc == 0 else "FAIL"), "log": str(log.name)})
    data = {"sanitizer": sanitizer, "runs": runs}
    if sanitizer is None and not r.dry_run:
        data["note"] = "compute-sanitizer not found on PATH"
    _write_json(r.out / "sanitizer.json", data)
    bad = any(x["status"] == "FAIL" for x in runs)
    return {"status": "FAIL" if bad else ("ok" if runs else "skipped"), "json": ["sanitizer.json"]}


def step_bench(r: Report, what: str) -> dict:
    """Run ``bench`` in a child; after a crash (a CUDA fault poisons the process) start a new child
    that resumes after the crashed configuration (at most 3 restarts)."""
    jsonl = r.out / f"{what}_bench.jsonl"
    jsonl.unlink(missing_ok=True)
    log = r.logs / f"{what}_bench.log"
    cmd = [sys.executable, "-m", "segformer_fast.gpu_report", "bench", what, "--out", str(r.out)]
    if r.dry_run:
        cmd.append("--dry-run")
    step = f"{'op' if what == 'ops' else 'model'}_bench"
    cap_end = time.time() + r.timeout(step)
    rc, restarts = None, 0
    while True:
        rc, _ = _run(cmd, log, min(cap_end - time.time(), r.left() - 5), r.env)
        if rc in (0, None) or restarts == 3 or r.left() < 30:
            break
        restarts += 1
    rows = [x for x in _read_jsonl(jsonl) if x.get("event") == "done"]
    started = {x["key"] for x in _read_jsonl(jsonl) if x.get("event") == "start"}
    crashed = sorted(started - {x["key"] for x in rows})
    data = {"label": DRY_RUN_LABEL if r.dry_run else None, "rows": rows, "crashed_or_cut": crashed,
            "restarts": restarts, "exit": rc}
    _write_json(r.out / f"{step}.json", data)
    errors = [x for x in rows if x.get("error")]
    status = CUT if rc is None else ("ok" if rc == 0 and not crashed else "FAIL")
    return {"status": status, "json": [f"{step}.json"], "rows": len(rows), "errors": len(errors)}


def run_report(out: Path, dry_run: bool = False, budget_min: float = 25.0, steps=STEPS) -> int:
    """Run the steps in order within the budget; exit 0 when every step that ran passed."""
    r = Report(out, dry_run, budget_min)
    funcs = {"selfcheck": step_selfcheck, "tests": step_tests, "sanitizer": step_sanitizer,
             "op_bench": lambda r: step_bench(r, "ops"), "model_bench": lambda r: step_bench(r, "models")}
    for name in STEPS:
        if name in steps:
            r.record(name, fresh=True, status="pending")
        elif name not in r.steps:
            r.record(name, status="not requested")
    for name in steps:
        if r.left() < 30:
            r.record(name, status="skipped (budget)")
            print(f"gpu-report: {name}: skipped (budget spent)", flush=True)
            continue
        print(f"gpu-report: {name} ({r.left() / 60:.1f} min of budget left)...", flush=True)
        r.record(name, fresh=True, status="running")
        t0 = time.perf_counter()
        try:
            res = funcs[name](r)
        except Exception as e:                 # the runner itself must go on to the next step
            res = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        r.record(name, **res)
        print(f"gpu-report: {name}: {res['status']} ({res['seconds']:.0f} s)", flush=True)
    print(f"gpu-report: wrote {out}/summary.md", flush=True)
    return 1 if any(r.steps[n].get("status") == "FAIL" for n in steps) else 0


# ---------------------------------------------------------------------------------------------
# benchmarks (child process)

def _peak_bytes_per_s(device_name: str) -> float | None:
    for key, peak in PEAK_BYTES.items():
        if key in device_name:
            return peak
    return None


def _time(fn, device: str, dry_run: bool) -> dict:
    """Median seconds of ``fn()`` (CUDA events on a GPU; one timed call on a dry run)."""
    import torch

    if dry_run:
        fn()
        t0 = time.perf_counter()
        fn()
        return {"median_s": time.perf_counter() - t0, "reps": 1}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(100, max(5, 0.2 / one)))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return {"median_s": statistics.median(times), "p20_s": sorted(times)[len(times) // 5],
            "p80_s": sorted(times)[(4 * len(times)) // 5], "reps": reps}


def _stage_shapes(variant: str, H: int, W: int) -> list[dict]:
    """Per stage: tokens (h, w), dim C, heads, sr, and the decoder width of ``variant``."""
    from .analysis.decode_head import stage_sizes
    from .models.segformer import VARIANTS

    dims, _, D = VARIANTS[variant]
    return [{"h": h, "w": w, "C": C, "heads": heads, "sr": sr, "D": D}
            for (h, w), C, heads, sr in zip(stage_sizes(H, W), dims, (1, 2, 5, 8), (8, 4, 2, 1))]


def op_specs(dry_run: bool) -> list[dict]:
    """Op calls to time: SegFormer-B2 shapes at 512x512 (batch 1 and 8) and 1024x2048 (batch 1);
    on a dry run the tiny odd shapes of ``selfcheck``."""
    if dry_run:
        return [{"op": "sra_attention", "B": 1, "N": 37, "M": 11, "C": 48, "heads": 2, "label": "tiny"},
                {"op": "dwconv_gelu", "B": 1, "H": 5, "W": 7, "C": 40, "label": "tiny"},
                {"op": "conv_layernorm", "B": 1, "Cin": 16, "H": 9, "W": 11, "Cout": 24, "k": 3, "s": 2, "p": 1,
                 "tokens": True, "label": "tiny"},
                {"op": "upsample_sum", "B": 1, "D": 24, "hws": [[9, 11], [5, 6], [3, 3], [2, 2]], "label": "tiny"}]
    specs = []
    for (H, W), B in (((512, 512), 1), ((512, 512), 8), ((1024, 2048), 1)):
        st = _stage_shapes("b2", H, W)
        tag = f"B2 {H}x{W} b{B}"
        for i, s in enumerate(st):
            specs.append({"op": "sra_attention", "B": B, "N": s["h"] * s["w"],
                          "M": (s["h"] // s["sr"]) * (s["w"] // s["sr"]), "C": s["C"], "heads": s["heads"],
                          "label": f"{tag} stage{i + 1} attention"})
            specs.append({"op": "dwconv_gelu", "B": B, "H": s["h"], "W": s["w"], "C": 4 * s["C"],
                          "label": f"{tag} stage{i + 1} Mix-FFN"})
        specs.append({"op": "conv_layernorm", "B": B, "Cin": 3, "H": H, "W": W, "Cout": st[0]["C"], "k": 7, "s": 4,
                      "p": 3, "tokens": False, "label": f"{tag} stem"})
        for i in (1, 2, 3):
            specs.append({"op": "conv_layernorm", "B": B, "Cin": st[i - 1]["C"], "H": st[i - 1]["h"],
                          "W": st[i - 1]["w"], "Cout": st[i]["C"], "k": 3, "s": 2, "p": 1, "tokens": True,
                          "label": f"{tag} patch embed {i + 1}"})
        for i in (0, 1, 2):
            sr = st[i]["sr"]
            specs.append({"op": "conv_layernorm", "B": B, "Cin": st[i]["C"], "H": st[i]["h"], "W": st[i]["w"],
                          "Cout": st[i]["C"], "k": sr, "s": sr, "p": 0, "tokens": True,
                          "label": f"{tag} stage{i + 1} sr{sr}"})
        specs.append({"op": "upsample_sum", "B": B, "D": st[0]["D"], "hws": [[s["h"], s["w"]] for s in st],
                      "label": f"{tag} decoder"})
    return specs


def _op_call(spec: dict, device: str, dtype, grad: bool):
    """(call(backend) -> output tensor, leaves) for one spec, inputs at unit scale."""
    import torch

    from . import ops

    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    op, B = spec["op"], spec["B"]
    if op == "sra_attention":
        C = spec["C"]
        q, kv = t(B, spec["N"], C), t(B, spec["M"], 2 * C)
        return (lambda b: ops.sra_attention(q, kv[..., :C], kv[..., C:], spec["heads"], backend=b)), [q, kv]
    if op == "dwconv_gelu":
        C = spec["C"]
        x, w, bias = t(B, spec["H"] * spec["W"], C), t(C, 1, 3, 3, scale=1 / 3), t(C, scale=0.2)
        return (lambda b: ops.dwconv_gelu(x, (spec["H"], spec["W"]), w, bias, backend=b)), [x, w, bias]
    if op == "conv_layernorm":
        Cin, Cout, k = spec["Cin"], spec["Cout"], spec["k"]
        x = t(B, spec["H"] * spec["W"], Cin) if spec["tokens"] else t(B, Cin, spec["H"], spec["W"])
        w, bias = t(Cout, Cin, k, k, scale=(Cin * k * k) ** -0.5), t(Cout, scale=0.2)
        nw, nb = t(Cout, scale=0.3), t(Cout, scale=0.2)
        hw = (spec["H"], spec["W"]) if spec["tokens"] else None
        return (lambda b: ops.conv_layernorm(x, w, bias, nw, nb, spec["s"], spec["p"], 1e-6, hw, backend=b)[0]), \
            [x, w, bias, nw, nb]
    if op == "upsample_sum":
        D, hws = spec["D"], [tuple(hw) for hw in spec["hws"]]
        maps = [t(B, h * w, D) for h, w in hws]
        params = [t(D, scale=0.5), t(D, scale=0.5), t(D, scale=0.2)]
        return (lambda b: ops.upsample_sum(maps, hws, hws[0], *params, relu=True, backend=b)), maps + params
    raise KeyError(f"gpu-report has no benchmark shapes for op {op!r}")


def op_bytes(spec: dict, dtype, backward: bool) -> float:
    """Modelled HBM bytes of the fused kernel(s) for one call (``segformer_fast.analysis``)."""
    import torch

    from .analysis.conv_layernorm import conv_layernorm_cost
    from .analysis.dwconv_gelu import dwconv_gelu_cost
    from .analysis.sra_attention import sra_attention_cost

    e = torch.empty((), dtype=dtype).element_size()
    op, B = spec["op"], spec["B"]
    if op == "sra_attention":
        return sra_attention_cost(B, spec["N"], spec["M"], spec["C"], spec["heads"], dtype, backward)["fused"].bytes
    if op == "dwconv_gelu":
        return dwconv_gelu_cost(B, spec["H"], spec["W"], spec["C"], e, backward)["fused"].bytes
    if op == "conv_layernorm":
        return conv_layernorm_cost(B, spec["Cin"], spec["H"], spec["W"], spec["Cout"], spec["k"], spec["s"],
                                   spec["p"], dtype, spec["tokens"], backward)["fused"].bytes
    if op == "upsample_sum":
        # no analysis model for the op alone: its minimum traffic, every map read once and the
        # output written once (backward: read dy, write every map's gradient; parameters negligible)
        h0, w0 = spec["hws"][0]
        maps = sum(h * w for h, w in spec["hws"]) * B * spec["D"] * e
        out = h0 * w0 * B * spec["D"] * e
        return (maps + out) * (2 if backward else 1)
    raise KeyError(op)


def _emit(f, **row) -> None:
    f.write(json.dumps(row, default=str) + "\n")
    f.flush()


def _done_keys(path: Path) -> set:
    """Configurations already started by an earlier child (finished or crashed): never rerun."""
    return {x["key"] for x in _read_jsonl(path) if x.get("event") == "start"}


def bench_ops(out: Path, dry_run: bool) -> None:
    """Time every op x implementation x dtype x mode of :func:`op_specs`, appending JSON lines."""
    import torch

    from . import backends

    device = "cpu" if dry_run else "cuda"
    gpu = "" if dry_run else torch.cuda.get_device_name()
    peak = None if dry_run else _peak_bytes_per_s(gpu)
    path = out / "ops_bench.jsonl"
    done = _done_keys(path)
    dtypes = ("fp32",) if dry_run else ("fp16", "bf16", "fp32")
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    with open(path, "a") as f:
        for dname in dtypes:
            for mode in ("fwd", "fwd+bwd"):
                for spec in op_specs(dry_run):
                    grad = mode == "fwd+bwd"
                    for impl in backends.which(spec["op"], device, backend="reference").reasons:
                        c = backends.which(spec["op"], device, dt[dname], backend=impl, needs_grad=grad)
                        if c.name != impl or c.same_as:
                            continue
                        key = f"{spec['label']}|{spec['op']}|{impl}|{dname}|{mode}"
                        if key in done:
                            continue
                        _emit(f, event="start", key=key)
                        row = {"event": "done", "key": key, "op": spec["op"], "shape": spec["label"], "impl": impl,
                               "dtype": dname, "mode": mode, "device": gpu or "cpu (dry run)", "spec": spec}
                        try:
                            call, leaves = _op_call(spec, device, dt[dname], grad)
                            if grad:
                                probe = call(impl)
                                gout = torch.randn_like(probe)
                                del probe

                                def fn():
                                    for t in leaves:
                                        t.grad = None
                                    call(impl).backward(gout)
                            else:
                                def fn():
                                    with torch.no_grad():
                                        call(impl)
                            row.update(_time(fn, device, dry_run))
                            row["model_bytes"] = op_bytes(spec, dt[dname], grad)
                            row["gb_per_s"] = row["model_bytes"] / row["median_s"] / 1e9
                            row["pct_roofline"] = (None if peak is None else
                                                   100 * row["model_bytes"] / peak / row["median_s"])
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                            if "out of memory" in str(e).lower():
                                torch.cuda.empty_cache()
                        _emit(f, **row)


MODEL_IMPLS = ("hf_sdpa", "patched_triton", "patched_cuda", "compile_default", "patched_compile",
               "compile_max_autotune")


def model_configs(dry_run: bool) -> list[tuple]:
    """(impl, variant, (H, W), batch, dtype) in priority order: the eager implementations over every
    shape first (fp16 before bf16 before fp32, 512 before 1024x2048), then the compiled ones."""
    if dry_run:
        return [(impl, "tiny", (64, 64), 1, "fp32") for impl in MODEL_IMPLS]
    shapes = [(s, b, d, v) for s, b in (((512, 512), 1), ((512, 512), 8), ((1024, 2048), 1), ((1024, 2048), 8))
              for d in ("fp16", "bf16", "fp32") for v in ("b0", "b2", "b5")]
    out = []
    for group in (MODEL_IMPLS[:3], MODEL_IMPLS[3:5], MODEL_IMPLS[5:]):
        out += [(impl, v, s, b, d) for s, b, d, v in shapes for impl in group]
    return out


def _model(variant: str):
    from .bench import hf_segformer

    if variant == "tiny":
        from .selfcheck import tiny_hf
        return tiny_hf()
    return hf_segformer(variant)


def bench_models(out: Path, dry_run: bool) -> None:
    """Time every configuration of :func:`model_configs` (eval, no_grad), appending JSON lines;
    each row also records the logits' difference from HF SDPA in the same dtype."""
    import copy

    import torch

    import segformer_fast

    from . import backends

    device = "cpu" if dry_run else "cuda"
    gpu = "" if dry_run else torch.cuda.get_device_name()
    path = out / "models_bench.jsonl"
    done = _done_keys(path)
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    masters: dict = {}      # variant -> fp32 CPU model (building B5 with its init takes seconds)
    stock: dict = {}        # (variant, dtype) -> model on the device
    reference: dict = {}    # (variant, H, W, B, dtype) -> HF SDPA logits, fp32 on the CPU
    with open(path, "a") as f:
        for impl, variant, (H, W), B, dname in model_configs(dry_run):
            key = f"{impl}|{variant}|{H}x{W}|b{B}|{dname}"
            if key in done:
                continue
            _emit(f, event="start", key=key)
            row = {"event": "done", "key": key, "impl": impl, "variant": variant, "size": [H, W], "batch": B,
                   "dtype": dname, "device": gpu or "cpu (dry run)"}
            try:
                if variant not in masters:
                    masters[variant] = _model(variant)
                if (variant, dname) not in stock:
                    stock[(variant, dname)] = copy.deepcopy(masters[variant]).to(device, dt[dname])
                base = stock[(variant, dname)]
                if impl == "patched_cuda":
                    missing = [op for op in backends.ops()
                               if backends.which(op, device, dt[dname], backend="cuda").name is None]
                    if missing:
                        raise RuntimeError(f"no cuda implementation here for {', '.join(missing)}")
                model = base
                if impl.startswith("patched"):
                    model = copy.deepcopy(base)
                    segformer_fast.patch(model, backend={"patched_triton": "triton", "patched_cuda": "cuda"}
                                         .get(impl, "auto"))
                if "compile" in impl:
                    # fresh caches: a compiled module past dynamo's recompile limit would silently run eager
                    torch._dynamo.reset()
                    mode = "max-autotune" if impl == "compile_max_autotune" else None
                    model = torch.compile(model, mode=mode, dynamic=False)
                x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device, dt[dname])

                def fn():
                    with torch.no_grad():
                        return model(pixel_values=x).logits
                t0 = time.perf_counter()
                logits = fn()                                     # compiles / builds / warms up
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                row["first_call_s"] = time.perf_counter() - t0
                rkey = (variant, H, W, B, dname)
                if impl == "hf_sdpa":
                    reference[rkey] = logits.float().cpu()
                if rkey in reference:
                    want = reference[rkey]
                    got = logits.float().cpu()
                    row["rel_err_vs_hf"] = ((got - want).abs().max() / want.abs().max()).item()
                del logits
                row.update(_time(fn, device, dry_run))
                row["images_per_s"] = B / row["median_s"]
                if device == "cuda":
                    row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            _emit(f, **row)


# ---------------------------------------------------------------------------------------------
# summary.md

def _fmt_ms(s) -> str:
    return "-" if s is None else f"{1e3 * s:.3f} ms"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def summary(out: Path) -> str:
    """The markdown summary of whatever step JSON exists under ``out`` (rewritten after each step)."""
    rep = _read_json(out / "report.json") or {}
    info = _read_json(out / "info.json") or {}
    dev = info.get("device", {})
    v = info.get("versions", {})
    lines = ["# segformer_fast gpu-report", ""]
    if rep.get("dry_run"):
        lines += [f"**{DRY_RUN_LABEL}.**", ""]
    if dev:
        where = (f"{dev['name']} (compute capability {dev['capability']}, {dev.get('memory_gib')} GiB)"
                 if dev.get("type") == "cuda" else f"no GPU: {dev.get('name')}")
        lines += [f"- machine: {where}",
                  f"- python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton "
                  f"{v.get('triton')}, transformers {v.get('transformers')}, nvcc {v.get('nvcc')}"]
    lines += [f"- started {rep.get('started')}, {rep.get('elapsed_s')} s elapsed of a "
              f"{rep.get('budget_min')} min budget", "", "## Steps", ""]
    lines += _table(["step", "status", "time", "results"],
                    [[n, s.get("status"), f"{s['seconds']:.0f} s" if "seconds" in s else "-",
                      ", ".join(s.get("json", [])) or s.get("error", "")] for n, s in rep.get("steps", {}).items()])

    sc = _read_json(out / "selfcheck.json")
    if sc:
        rows = sc.get("rows", [])
        bad = [x for x in rows if x["status"] == "FAIL"]
        lines += ["", "## selfcheck", "",
                  f"{sum(x['status'] == 'ok' for x in rows)} passed, {len(bad)} failed, "
                  f"{sum(x['status'] == 'skip' for x in rows)} not available (exit {sc.get('exit_code')})"]
        impls = sorted({f"{x['op']}[{x['impl']}] on {x['device']}" for x in rows if x["status"] == "ok"})
        lines += ["", "checked: " + ", ".join(impls)]
        lines += [f"- FAIL {x['op']}[{x['impl']}] {x['device']} {x['dtype']} {x['case']}: {x['detail']}" for x in bad]

    t = _read_json(out / "tests.json")
    if t:
        lines += ["", "## tests", "", f"pytest {t.get('selection')}: {t.get('passed')} passed, {t.get('failures')} "
                  f"failed, {t.get('errors')} errors, {t.get('skipped')} skipped ({t.get('time_s', 0):.0f} s; "
                  "tests-junit.xml)"]
        lines += [f"- {x['test']}: {x['message']}" for x in t.get("failed", [])[:40]]

    s = _read_json(out / "sanitizer.json")
    if s:
        lines += ["", "## compute-sanitizer", ""]
        if s.get("note"):
            lines.append(s["note"])
        lines += _table(["tool", "status", "errors", "cases run", "time"],
                        [[x["tool"], x["status"], x.get("errors", "-"), len(x.get("cases_ok", [])),
                          f"{x.get('seconds', 0):.0f} s"] for x in s.get("runs", [])])

    ob = _read_json(out / "op_bench.json")
    if ob:
        lines += ["", "## op benchmarks", ""]
        if ob.get("label"):
            lines += [f"**{ob['label']}** (no roofline percentage).", ""]
        lines.append("GB/s = the fused kernel's modelled HBM bytes (segformer_fast.analysis) / median time, "
                     "for every implementation (effective bandwidth: the same bytes for all); % = of the "
                     "GPU's HBM bandwidth.")
        lines += [""] + _table(["op", "shape", "dtype", "mode", "impl", "median", "GB/s", "% roofline"],
                               [[x["op"], x["shape"], x["dtype"], x["mode"], x["impl"],
                                 x.get("error") or _fmt_ms(x.get("median_s")),
                                 f"{x['gb_per_s']:.1f}" if x.get("gb_per_s") else "-",
                                 f"{x['pct_roofline']:.1f}" if x.get("pct_roofline") is not None else "-"]
                                for x in ob.get("rows", [])])
        if ob.get("crashed_or_cut"):
            lines.append(f"\ncrashed or cut by the budget: {', '.join(ob['crashed_or_cut'])}")

    mb = _read_json(out / "model_bench.json")
    if mb:
        lines += ["", "## model benchmarks (eval, no_grad)", ""]
        if mb.get("label"):
            lines += [f"**{mb['label']}**", ""]
        rows = mb.get("rows", [])
        hf = {(x["variant"], tuple(x["size"]), x["batch"], x["dtype"]): x.get("median_s")
              for x in rows if x["impl"] == "hf_sdpa" and not x.get("error")}
        table = []
        for x in rows:
            base = hf.get((x["variant"], tuple(x["size"]), x["batch"], x["dtype"]))
            speed = f"{base / x['median_s']:.2f}x" if base and x.get("median_s") else "-"
            err = x.get("rel_err_vs_hf")
            table.append([x["variant"], f"{x['size'][0]}x{x['size'][1]}", x["batch"], x["dtype"], x["impl"],
                          x.get("error") or _fmt_ms(x.get("median_s")),
                          f"{x['images_per_s']:.1f}" if x.get("images_per_s") else "-", speed,
                          "-" if err is None else f"{err:.1e}"])
        lines += _table(["model", "input", "batch", "dtype", "impl", "median", "img/s", "vs HF SDPA",
                         "max|logits-HF|/max|HF|"], table)
        if mb.get("crashed_or_cut"):
            lines.append(f"\ncrashed or cut by the budget: {', '.join(mb['crashed_or_cut'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p) -> None:
    """The ``gpu-report`` subcommand's options."""
    p.add_argument("--out", help="results folder (default benchmarks/results/gpu/<date>-<gpu>, or "
                                 "benchmarks/results/dry-run on --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes (interpreter, "
                                                          "emulation): checks the runner, produces no GPU numbers")
    p.add_argument("--budget-min", type=float, default=25.0, help="wall-time budget in minutes (default 25)")
    p.add_argument("--steps", type=lambda s: s.split(","), default=list(STEPS),
                   help=f"a subset, in this order: {','.join(STEPS)}")


def _default_out(dry_run: bool) -> Path:
    import torch

    if dry_run or not torch.cuda.is_available():
        return ROOT / "benchmarks" / "results" / "dry-run"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return ROOT / "benchmarks" / "results" / "gpu" / f"{time.strftime('%Y-%m-%d')}-{gpu}"


def main(args) -> int:
    """``python -m segformer_fast gpu-report``."""
    import torch

    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        print(f"gpu-report: unknown steps {unknown}; expected some of {','.join(STEPS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-report: no CUDA device here; use --dry-run to check the runner on CPU", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else _default_out(args.dry_run)
    print(f"gpu-report: results under {out} ({'dry run on CPU' if args.dry_run else torch.cuda.get_device_name()}, "
          f"budget {args.budget_min:g} min)", flush=True)
    return run_report(out.resolve(), args.dry_run, args.budget_min, [s for s in STEPS if s in args.steps])


def _child(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m segformer_fast.gpu_report")
    p.add_argument("cmd", choices=["bench"])
    p.add_argument("what", choices=["ops", "models"])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    (bench_ops if a.what == "ops" else bench_models)(Path(a.out), a.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
