"""Command line: ``python -m segformer_fast demo``."""
from __future__ import annotations

import argparse
import sys
import time


def demo(args) -> int:
    import torch

    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:
        print("the demo needs transformers: pip install -e '.[test]'", file=sys.stderr)
        return 2
    from segformer_fast.models import from_hf
    from segformer_fast.testing import init_realistic_

    torch.manual_seed(args.seed)
    size = args.size
    print(f"building Hugging Face SegFormer-B0 (random weights, seed {args.seed}), input 1x3x{size}x{size}")
    hf = init_realistic_(SegformerForSemanticSegmentation(SegformerConfig(num_labels=150)), seed=args.seed).eval()
    ours = from_hf(hf).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        t0 = time.perf_counter()
        a = hf(x).logits
        t1 = time.perf_counter()
        b = ours(x)
        t2 = time.perf_counter()
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"logits {tuple(a.shape)}; our reference model vs HF: max|diff| / max|logits| = {err:.2e}")
    print(f"time per image (one run, CPU): HF {1e3 * (t1 - t0):.1f} ms, reference model {1e3 * (t2 - t1):.1f} ms")
    ok = err <= 1e-4
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segformer_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="patch an HF SegFormer-B0, check parity, print the speed-up")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
