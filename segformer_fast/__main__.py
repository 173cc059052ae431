"""Command line.

    python -m segformer_fast demo    patch an HF SegFormer-B0, check parity, print the speed-up
    python -m segformer_fast bench   markdown table of ratios from a saved benchmark run
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
    patched = copy.deepcopy(hf)
    report = segformer_fast.patch(patched, backend=args.backend)
    _say(f"patched: {len(report.replaced)} modules replaced, {len(report.skipped)} skipped "
         f"(backend {args.backend}: runs '{segformer_fast.backends.resolve(torch.device(device), args.backend, ('triton',))}' here)")
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


def _latest_json(path: str | None) -> str:
    if path:
        return path
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    files = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no benchmark JSON under {root}: run `pytest benchmarks --benchmark-only` first")
    return files[-1]


def bench(args) -> int:
    path = _latest_json(args.json)
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    m = data.get("machine_info", {})
    print(f"benchmark run {os.path.basename(path)} — {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
          f"{data.get('datetime', '')}\n")
    print("| group | case | median | vs slowest |")
    print("|---|---|---|---|")
    for group, rows in groups.items():
        slowest = max(r["stats"]["median"] for r in rows)
        for r in sorted(rows, key=lambda r: -r["stats"]["median"]):
            case = r["extra_info"].get("impl") or r["name"].split("[")[-1].rstrip("]")
            print(f"| {group} | {case} | {1e3 * r['stats']['median']:.2f} ms | {slowest / r['stats']['median']:.2f}x |")
    return 0


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
    p = sub.add_parser("bench", help="markdown table of ratios from a pytest-benchmark JSON")
    p.add_argument("json", nargs="?", help="a JSON file (default: the newest under benchmarks/results)")
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
