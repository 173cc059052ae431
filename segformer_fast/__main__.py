"""Command line.

    python -m segformer_fast demo    patch an HF SegFormer-B0, check parity, print the speed-up
    python -m segformer_fast profile per-op time before and after patching (torch.profiler)
    python -m segformer_fast bench   markdown table of ratios from a saved benchmark run
    python -m segformer_fast kernels ahead-of-time sm_80/sm_90 compile of every Triton kernel
                                     launch of SegFormer B0-B5 (registers, spills, shared memory)
    python -m segformer_fast info    versions, device, what auto runs per op and why, build caches
    python -m segformer_fast selfcheck [--quick]   every op x implementation here vs fp64 reference
    python -m segformer_fast gpu-report --out DIR [--dry-run] [--budget-min N]   GPU validation +
                                     benchmarks as JSON + summary.md
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo(args) -> int:
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("the demo needs transformers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    import segformer_fast
    from segformer_fast.bench import hf_segformer, interleaved, median_ratio

    t_start = time.perf_counter()
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = args.variant.lower()
    _say(f"building Hugging Face SegFormer-{variant.upper()} (random weights at trained scale, seed "
         f"{args.seed}) on {device}, input {args.batch}x3x{args.size}x{args.size}, fp32")
    hf = hf_segformer(variant, seed=args.seed).to(device)
    if device == "cpu" and args.backend in ("auto", "cpu"):
        _say("preparing the native CPU kernels (the first run on a machine compiles them, ~30 s)...")
        t0 = time.perf_counter()
        ok = segformer_fast.backends.native_cpu_available()
        _say(f"  {'ready' if ok else 'unavailable: stock PyTorch compositions will run'} "
             f"({time.perf_counter() - t0:.1f} s)")
    patched = copy.deepcopy(hf)
    report = segformer_fast.patch(patched, backend=args.backend)
    kernels = {"triton": "Triton kernels", "cpu": "native CPU kernels where they exist + stock PyTorch ops",
               "torch": "stock PyTorch compositions", "reference": "the reference ops"}
    here = segformer_fast.backends.which("upsample_sum", device, backend=args.backend).name or "torch"
    _say(f"patched: {len(report.replaced)} modules replaced, {len(report.skipped)} skipped "
         f"(backend {args.backend}: {kernels[here]} on {device})")
    for path, why in report.skipped:
        _say(f"  skipped {path}: {why}")

    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    a = hf(x).logits
    b = patched(x).logits
    err = ((a - b).abs().max() / a.abs().max()).item()
    ok = err <= 1e-3
    _say(f"parity: logits {tuple(a.shape)}, max|patched - hf| / max|hf| = {err:.2e} "
         f"({'OK' if ok else 'FAILED'}, limit 1e-3)")

    _say(f"timing {args.rounds} interleaved rounds (HF with SDPA vs patched)...")
    times = interleaved({"hf": lambda: hf(x), "patched": lambda: patched(x)}, rounds=args.rounds,
                        device=device, progress=lambda m: _say(f"  {m}"))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ratio = median_ratio(times, "hf", "patched")
    _say(f"time per image: HF {1e3 * med['hf'] / args.batch:.1f} ms, patched "
         f"{1e3 * med['patched'] / args.batch:.1f} ms -> speed-up {ratio:.2f}x "
         f"(median of per-round ratios, {device})")
    _say(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


def profile(args) -> int:
    """Where the time goes, op by op, before and after patching (torch.profiler, self time)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import segformer_fast
    from segformer_fast.bench import hf_segformer

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    hf = hf_segformer(args.variant, seed=0).to(device)
    patched = copy.deepcopy(hf)
    segformer_fast.patch(patched, backend=args.backend)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for name, model in (("HF (SDPA)", hf), ("patched", patched)):
        model(x)  # warm-up: allocator, folded-weight caches, kernel compilation
        with torch_profile(activities=activities) as prof:
            for _ in range(args.rounds):
                model(x)
        events = prof.key_averages()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) / args.rounds
        _say(f"\n## {name}: SegFormer-{args.variant.upper()} {args.batch}x3x{args.size}x{args.size} on {device}, "
             f"{total / 1e3:.1f} ms of op self time per forward\n")
        _say("| op | calls/forward | ms/forward | share |")
        _say("|---|---|---|---|")
        for e in sorted(events, key=lambda e: -getattr(e, key))[: args.top]:
            t = getattr(e, key) / args.rounds
            _say(f"| {e.key} | {e.count // args.rounds} | {t / 1e3:.2f} | {100 * t / total:.1f}% |")
    return 0


def _latest_json(path: str | None) -> str:
    if path:
        return path
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    files = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no benchmark JSON under {root}: run `pytest benchmarks --benchmark-only` first")
    return files[-1]


def _group_key(b: dict) -> str:
    """Rows that differ only in their ``impl`` parameter are one comparison."""
    if b.get("group"):
        return b["group"]
    params = {k: v for k, v in (b.get("params") or {}).items() if k != "impl"}
    return b["name"].split("[")[0] + "[" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + "]"


def bench(args) -> int:
    path = _latest_json(args.json)
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(_group_key(b), []).append(b)
    m = data.get("machine_info", {})
    print(f"benchmark run {os.path.basename(path)}: {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
          f"{data.get('datetime', '')}\n")
    print("| case | implementation | median | speed-up vs slowest |")
    print("|---|---|---|---|")
    for group, rows in groups.items():
        slowest = max(r["stats"]["median"] for r in rows)
        for r in sorted(rows, key=lambda r: -r["stats"]["median"]):
            impl = (r.get("params") or {}).get("impl") or r["extra_info"].get("impl") or r["name"]
            print(f"| {group} | {impl} | {1e3 * r['stats']['median']:.2f} ms | {slowest / r['stats']['median']:.2f}x |")
    return 0


def _kernels(args) -> int:
    from segformer_fast.analysis.aot import main as kernels_main
    return kernels_main(args)


def _add_machine_commands(sub) -> None:
    """info, selfcheck and gpu-report (segformer_fast/info.py, selfcheck.py, gpu_report.py)."""
    from segformer_fast import gpu_report, info, selfcheck

    for name, module, text in (
            ("info", info, "versions, device, which implementation auto picks per op and why, build caches"),
            ("selfcheck", selfcheck, "every op on every implementation available here vs the fp64 reference, "
                                     "then a patched tiny HF model vs stock (exit 1 on any failure)"),
            ("gpu-report", gpu_report, "validate and benchmark everything on a GPU machine: JSON + summary.md "
                                       "under --out (--dry-run: the same on CPU at tiny shapes)")):
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(fn=module.main)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segformer_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="patch an HF SegFormer, check parity, print the speed-up")
    p.add_argument("--variant", default="b0", choices=["b0", "b1", "b2", "b3", "b4", "b5"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.set_defaults(fn=demo)
    p = sub.add_parser("profile", help="per-op time table before and after patching (torch.profiler)")
    p.add_argument("--variant", default="b0", choices=["b0", "b1", "b2", "b3", "b4", "b5"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--backend", default="auto")
    p.set_defaults(fn=profile)
    p = sub.add_parser("bench", help="markdown table of ratios from a pytest-benchmark JSON")
    p.add_argument("json", nargs="?", help="a JSON file (default: the newest under benchmarks/results)")
    p.set_defaults(fn=bench)
    p = sub.add_parser("kernels", help="compile every Triton kernel launch of SegFormer B0-B5 for sm_80/sm_90: "
                                       "registers, spills, shared memory (exit 1 on a spill or > 100 KB shared)")
    p.add_argument("--quick", action="store_true", help="B0 and B2 at 512x512, fp16 and fp32, batch 1 only")
    p.add_argument("--variants", type=lambda s: s.lower().split(","), help="e.g. b0,b2 (default b0-b5)")
    p.add_argument("--sizes", type=lambda s: [tuple(map(int, hw.split("x"))) for hw in s.split(",")],
                   help="e.g. 512x512,1024x2048 (the default)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), help="e.g. fp32,fp16,bf16 (the default)")
    p.add_argument("--archs", type=lambda s: [int(a) for a in s.split(",")], help="e.g. 80,90 (the default)")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], help="default 1,8")
    p.add_argument("--workers", type=int, default=2, help="compiles in flight (default 2)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(fn=_kernels)
    _add_machine_commands(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
