"""Other CPU inference engines as contenders, on the same weights, timed interleaved in one process.

    python -m segformer_fast.contenders --variant b0 --size 512 [--rounds 9] [--threads N]

prints, per contender, the median time, the median over rounds of (contender / patched fp32) and
(contender / patched bf16), and each one's logits error relative to the stock fp32 logits' scale.
Contenders: HF eager (SDPA), segformer_fast-patched fp32 and under ``torch.autocast("cpu",
torch.bfloat16)``, OpenVINO fp32 and at its default precision (bf16 where the CPU has it), ONNX
Runtime (all graph optimisations). OpenVINO and ONNX Runtime are optional (``pip install
segformer_fast[bench]``): a missing one is reported and skipped. Absolute times on a shared machine
mean little: read the ratios, which are taken within one round.
"""
from __future__ import annotations

import argparse
import copy
import io
import statistics
import warnings

import torch

from .bench import hf_segformer, interleaved, median_ratio, versions


class Logits(torch.nn.Module):
    """``pixel_values -> logits`` (the engines export a plain tensor function)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def openvino_runner(model, x: torch.Tensor, precision: str | None = None):
    """OpenVINO's CPU plugin on ``model`` (converted from torch with ``x`` as example input).
    ``precision``: "f32", "bf16", or None for OpenVINO's default (bf16 on CPUs with AVX512-BF16/AMX).
    Returns ``run(x) -> logits`` or raises ImportError."""
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(Logits(model).eval(), example_input=x)
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(inp: torch.Tensor):
        request.infer({0: inp.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    run.precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return run


def onnxruntime_runner(model, x: torch.Tensor):
    """ONNX Runtime (CPU, all graph optimisations, torch's thread count) on ``model`` exported with
    ``torch.onnx.export(dynamo=True)``. Returns ``run(x) -> logits`` or raises ImportError."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Logits(model).eval(), (x,), dynamo=True, verbose=False)
    buf = io.BytesIO()
    program.save(buf)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(inp: torch.Tensor):
        return torch.from_numpy(sess.run(None, {name: inp.numpy()})[0])
    return run


def contenders(variant: str = "b0", size: int = 512, engines: bool = True,
               say=lambda msg: None) -> tuple[dict, torch.Tensor]:
    """name -> ``run(x) -> logits`` for every contender available here, and the input ``x``."""
    import segformer_fast

    stock = hf_segformer(variant)
    patched = copy.deepcopy(stock)
    segformer_fast.patch(patched)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def hf(inp):
        with torch.inference_mode():
            return stock(pixel_values=inp).logits

    def fp32(inp):
        with torch.inference_mode():
            return patched(pixel_values=inp).logits

    def bf16(inp):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return patched(pixel_values=inp).logits

    runs = {"hf_sdpa": hf, "patched_fp32": fp32, "patched_bf16_autocast": bf16}
    if engines:
        for name, build in (("openvino_fp32", lambda: openvino_runner(stock, x, "f32")),
                            ("openvino_default", lambda: openvino_runner(stock, x)),
                            ("onnxruntime", lambda: onnxruntime_runner(stock, x)),
                            # the patched model exported: the folded decoder travels into ONNX
                            ("onnxruntime_patched", lambda: onnxruntime_runner(patched, x))):
            try:
                runs[name] = build()
                say(f"{name}: ready" + (f" (precision {runs[name].precision})"
                                        if hasattr(runs[name], "precision") else ""))
            except ImportError as e:
                say(f"{name}: skipped ({e})")
    return runs, x


NAMES = ("hf_sdpa", "patched_fp32", "patched_bf16_autocast", "openvino_fp32", "openvino_default",
         "onnxruntime", "onnxruntime_patched")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m segformer_fast.contenders", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch and engine threads (default: torch's)")
    p.add_argument("--only", default=None, help="comma-separated contender names")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda m: print(m, flush=True)  # noqa: E731
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(NAMES):
        p.error(f"--only: unknown contender(s) {', '.join(sorted(only - set(NAMES)))}; "
                f"expected names from {', '.join(NAMES)}")
    runs, x = contenders(args.variant, args.size, say=say)
    if only:
        keep = only | {"patched_fp32", "hf_sdpa"}
        runs = {k: v for k, v in runs.items() if k in keep}
    ref = runs["hf_sdpa"](x).float()
    scale = ref.abs().max().item()
    errors = {name: (fn(x).float() - ref).abs().max().item() / scale for name, fn in runs.items()}
    times = interleaved({name: (lambda fn=fn: fn(x)) for name, fn in runs.items()}, rounds=args.rounds,
                        warmup=2)
    v = versions()
    print(f"\n{args.variant.upper()} {args.size}x{args.size}, batch 1, {v['processor'] or v['machine']}, "
          f"{torch.get_num_threads()} threads, torch {v['torch']}, {args.rounds} interleaved rounds")
    print("| contender | median ms | vs patched fp32 | vs patched bf16 | max err / logit scale |")
    print("|---|---|---|---|---|")
    for name in runs:
        r32 = median_ratio(times, name, "patched_fp32")
        r16 = median_ratio(times, name, "patched_bf16_autocast") if "patched_bf16_autocast" in runs else float("nan")
        print(f"| {name} | {1e3 * statistics.median(times[name]):.1f} | {r32:.2f} | {r16:.2f} | "
              f"{errors[name]:.1e} |")
    print("(ratios: median over rounds of contender time / patched time; > 1 means patched is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
