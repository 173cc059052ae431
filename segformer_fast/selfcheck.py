"""``python -m segformer_fast selfcheck [--quick]``: the first thing to run on a new machine.

Every op on every implementation that can run here, discovered through ``backends.which`` (never a
hard-coded list: an implementation added to an op is checked the day it is registered), at a few
small odd shapes, forward and backward, against the fp64 reference under the numerics contract
(``segformer_fast.testing.check_op``); then a tiny Hugging Face SegFormer patched with each backend
that can run every op here vs its stock twin (within 1e-4 of the logits' scale, fp32). A table,
and exit status 1 on any failure.

Devices: CUDA tensors when a GPU is present (Triton and CUDA kernels natively), CPU tensors always
(the native CPU kernels, the torch compositions). Without a GPU, :func:`cpu_environment` turns
on the Triton interpreter (``TRITON_INTERPRET=1``, before any kernel module is imported) and the
CUDA emulation (``SEGFORMER_FAST_CUDA_EMULATE=1``), so the GPU code runs on CPU tensors too.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

DTYPES = ("fp32", "fp16", "bf16")
MODEL_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# environment

def cpu_environment() -> dict:
    """The variables this machine needs so GPU code runs on CPU tensors: without a CUDA device,
    ``TRITON_INTERPRET=1`` and ``SEGFORMER_FAST_CUDA_EMULATE=1`` (those the user has not set
    either way). Empty on a GPU machine."""
    import torch

    from .kernels.cuda import EMULATE_ENV

    if torch.cuda.is_available():
        return {}
    return {name: "1" for name in ("TRITON_INTERPRET", EMULATE_ENV) if name not in os.environ}


def in_fresh_process_with(env: dict, argv: list[str]) -> int | None:
    """Apply ``env`` (see :func:`cpu_environment`). Triton reads ``TRITON_INTERPRET`` when it is
    imported, and importing segformer_fast already imports it (torch.library custom ops), so the
    CLI re-runs itself in a child process with ``env`` set and returns the child's exit status.
    None: nothing needed (the caller goes on in this process)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")    # Triton 3.9 warns when unset
    if not env:
        return None
    if "TRITON_INTERPRET" not in env or "triton" not in sys.modules:
        os.environ.update(env)
        return None
    import subprocess

    print(f"no CUDA device: re-running with {' '.join(f'{k}={v}' for k, v in env.items())} (the Triton "
          "interpreter and the CUDA emulation on CPU tensors)", flush=True)
    return subprocess.call([sys.executable, "-m", "segformer_fast", *argv], env={**os.environ, **env})


def devices() -> list[str]:
    """Device types whose tensors are checked here: cuda first when present, then cpu."""
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


# ---------------------------------------------------------------------------------------------
# cases: small odd shapes, weights and inputs at realistic scale (and one large-magnitude case)

@dataclass
class Case:
    """One op call: ``make(backend)`` gives the op pinned to a backend, ``reference`` the spec,
    ``args(device)`` the tensors (leaves with requires_grad); ``facts`` what dispatch judges shape
    limits by (``head_dim``...), so an implementation that refuses this shape is a skip, not a FAIL."""
    op: str
    name: str
    make: Callable[[str], Callable]
    reference: Callable
    args: Callable[[str], list]
    facts: dict = field(default_factory=dict)


def _gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def _leaves(ts, device):
    return [t.to(device).requires_grad_() for t in ts]


def _sra_cases():
    import torch

    from . import reference
    from .ops import sra_attention

    def case(name, B, N, M, heads, d, mag):
        def args(device):
            g = _gen(1)
            C = heads * d
            q = torch.randn(B, N, C, generator=g) * mag
            kv = torch.randn(B, M, 2 * C, generator=g)     # k, v: column halves of one kv projection
            kv[..., :C] *= mag
            return _leaves([q, kv], device)

        def split(fn, **kw):
            def run(q, kv):
                C = q.shape[-1]
                return fn(q, kv[..., :C], kv[..., C:], heads, **kw)
            return run
        return Case("sra_attention", name, lambda b: split(sra_attention, backend=b),
                    split(reference.sra_attention), args, {"head_dim": d})
    return [case("B2 N37 M11 h2 d24", 2, 37, 11, 2, 24, 1.0),
            case("B1 N50 M9 h1 d64 x3", 1, 50, 9, 1, 64, 3.0),
            case("B1 N19 M7 h3 d40", 1, 19, 7, 3, 40, 1.0)]


def _dwconv_cases():
    import torch

    from . import reference
    from .ops import dwconv_gelu

    def case(name, B, H, W, C, mag):
        def args(device):
            g = _gen(2)
            return _leaves([torch.randn(B, H * W, C, generator=g) * mag,
                            torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g) * 0.2], device)
        return Case("dwconv_gelu", name,
                    lambda b: (lambda x, w, bias: dwconv_gelu(x, (H, W), w, bias, backend=b)),
                    lambda x, w, bias: reference.dwconv_gelu(x, (H, W), w, bias), args)
    return [case("B2 5x7 C40", 2, 5, 7, 40, 1.0), case("B1 7x13 C100 x30", 1, 7, 13, 100, 30.0),
            case("B1 3x5 C160", 1, 3, 5, 160, 1.0)]


def _conv_ln_cases():
    import torch

    from . import reference
    from .ops import conv_layernorm
    from .testing import init_realistic_

    def case(name, B, Cin, H, W, Cout, k, stride, pad, tokens, eps, mag):
        def args(device):
            conv = init_realistic_(torch.nn.Conv2d(Cin, Cout, k, stride, pad), 3)
            ln = init_realistic_(torch.nn.LayerNorm(Cout, eps=eps), 4)
            x = torch.randn(B, Cin, H, W, generator=_gen(5)) * mag
            if tokens:
                x = x.flatten(2).transpose(1, 2).contiguous()
            return _leaves([x, conv.weight.detach(), conv.bias.detach(), ln.weight.detach(),
                            ln.bias.detach()], device)
        hw = (H, W) if tokens else None

        def bind(fn, **kw):
            return lambda x, w, b, nw, nb: fn(x, w, b, nw, nb, stride, pad, eps, hw, **kw)[0]
        return Case("conv_layernorm", name, lambda b: bind(conv_layernorm, backend=b),
                    bind(reference.conv_layernorm), args)
    return [case("tokens B2 16->24 9x11 k3s2p1", 2, 16, 9, 11, 24, 3, 2, 1, True, 1e-6, 1.0),
            case("image B1 3->16 19x23 k7s4p3", 1, 3, 19, 23, 16, 7, 4, 3, False, 1e-6, 1.0),
            case("tokens B1 8->12 13x9 sr4 x30", 1, 8, 13, 9, 12, 4, 4, 0, True, 1e-5, 30.0)]


def _upsample_cases():
    import torch

    from . import reference
    from .ops import upsample_sum

    def case(name, B, D, hws, epilogue, mag):
        n = len(hws)

        def args(device):
            g = _gen(6)
            maps = [torch.randn(B, h * w, D, generator=g) * mag for h, w in hws]
            params = [torch.randn(D, generator=g) * 0.5]
            if epilogue:
                params += [torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g) * 0.2]
            return _leaves(maps + params, device)

        def bind(fn, **kw):
            return lambda *a: fn(list(a[:n]), hws, hws[0], *a[n:], relu=epilogue, **kw)
        return Case("upsample_sum", name, lambda b: bind(upsample_sum, backend=b),
                    bind(reference.upsample_sum), args)
    hws = [(9, 11), (5, 6), (3, 3), (2, 2)]
    return [case("B2 D24 4 maps 9x11 bias+bn+relu", 2, 24, hws, True, 1.0),
            case("B1 D40 4 maps 9x11 x30", 1, 40, hws, True, 30.0),
            case("B2 D16 2 maps 13x7 bias only", 2, 16, [(13, 7), (4, 3)], False, 1.0)]


def _resize_argmax_cases():
    import torch

    from . import reference
    from .ops import resize_argmax

    def case(name, B, K, h, w, size, align_corners, mag):
        def args(device):
            return [(torch.randn(B, K, h, w, generator=_gen(7)) * mag).to(device)]

        def make(backend):
            def run(logits):
                labels, scores = resize_argmax(logits, size, align_corners, return_scores=True, backend=backend)
                # labels: those of interpolate + argmax on the same input, except at near-ties
                up = torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear",
                                                     align_corners=align_corners)
                top2 = up.topk(2, dim=1).values
                clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * up.abs().amax().clamp_min(1e-30)
                wrong = int(((labels != up.argmax(1)) & clear).sum())
                if wrong:
                    raise AssertionError(f"resize_argmax[{backend}]: {wrong} labels differ from "
                                         "interpolate + argmax away from near-ties")
                return scores
            return run
        return Case("resize_argmax", name, make,
                    lambda logits: reference.resize_argmax(logits, size, align_corners, return_scores=True)[1],
                    args)
    return [case("B2 K19 7x9 -> 29x37", 2, 19, 7, 9, (29, 37), False, 3.0),
            case("B1 K150 5x6 -> 17x23 align_corners", 1, 150, 5, 6, (17, 23), True, 1.0),
            case("B1 K7 13x11 -> 6x5 (down)", 1, 7, 13, 11, (6, 5), False, 1.0)]


_CASES = {"sra_attention": _sra_cases, "dwconv_gelu": _dwconv_cases, "conv_layernorm": _conv_ln_cases,
          "upsample_sum": _upsample_cases, "resize_argmax": _resize_argmax_cases}


def cases(op: str) -> list[Case]:
    """The shapes checked for ``op`` (``quick`` runs the first one an implementation accepts)."""
    if op not in _CASES:
        raise KeyError(f"selfcheck has no cases for op {op!r}: add them to segformer_fast/selfcheck.py")
    return _CASES[op]()


# ---------------------------------------------------------------------------------------------
# rows

@dataclass
class Row:
    """One line of the table: status "ok", "FAIL" or "skip" (skips never fail the check)."""
    kind: str                 # "op" or "model"
    op: str
    impl: str
    device: str
    dtype: str
    case: str
    status: str
    backward: bool = False
    worst: float | None = None     # max over outputs/gradients of err / bound (<= 1 passes)
    detail: str = ""
    seconds: float = 0.0
    results: list = field(default_factory=list)


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _ratio(r) -> float:
    if r.bound > 0:
        return r.err / r.bound
    return 0.0 if r.err == 0 else math.inf


def check_case(case: Case, impl: str, device: str, dtype: str, backward: bool) -> Row:
    """Run one case on one implementation under the contract; never raises (a crash is a FAIL)."""
    from .testing import check_op

    t0 = time.perf_counter()
    row = Row("op", case.op, impl, device, dtype, case.name, "ok", backward)
    try:
        args = case.args(device)
        if not backward:       # an inference call: dispatch must not see tensors needing grad
            args = [a.detach() if hasattr(a, "detach") else a for a in args]
        results = check_op(case.make(impl), case.reference, args, _dtype(dtype),
                           backward=backward, name=f"{case.op}[{impl}]")
        row.worst = max(_ratio(r) for r in results)
        row.results = [str(r) for r in results]
    except AssertionError as e:
        row.status, row.detail = "FAIL", str(e).splitlines()[0] if str(e) else "contract violated"
    except Exception as e:                     # a crash, a refusal at call time: also a failure
        row.status, row.detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    row.seconds = time.perf_counter() - t0
    return row


def implementations(op: str, device: str) -> list[str]:
    """Every implementation name ``op`` declares (``backends.which`` lists them all)."""
    from . import backends

    return list(backends.which(op, device, backend="reference").reasons)


def op_rows(ops=None, impls=None, dtypes=DTYPES, quick: bool = False, devs=None,
            progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Check every (op, implementation, device, dtype) ``backends.which`` accepts here. fp32 runs
    forward and backward (when the implementation has one); fp16/bf16 forward, plus backward
    without ``quick``. Refused combinations become "skip" rows carrying the reasons."""
    from . import backends

    rows = []
    for op in ops or backends.ops():
        for dev in devs or devices():
            for impl in implementations(op, dev):
                if impls and impl not in impls:
                    continue
                for dt in dtypes:
                    want_grad = dt == "fp32" or not quick
                    choice = backends.which(op, dev, _dtype(dt), backend=impl, needs_grad=want_grad)
                    if choice.name != impl and want_grad:        # e.g. no backward: check forward only
                        fwd = backends.which(op, dev, _dtype(dt), backend=impl)
                        if fwd.name == impl:
                            choice, want_grad = fwd, False
                    if choice.name != impl:
                        why = "; ".join(choice.reasons.get(impl) or ["refused"])
                        rows.append(Row("op", op, impl, dev, dt, "-", "skip", detail=why))
                        continue
                    if choice.same_as:
                        rows.append(Row("op", op, impl, dev, dt, "-", "skip",
                                        detail=f"declared as the {choice.same_as} composition (checked there)"))
                        continue
                    if op not in _CASES:       # an op newer than this file: visible, never a crash
                        rows.append(Row("op", op, impl, dev, dt, "-", "skip",
                                        detail="no selfcheck cases for this op yet: add them to "
                                               "segformer_fast/selfcheck.py"))
                        continue
                    ran, refused = 0, []
                    for case in cases(op):
                        if quick and ran:
                            break
                        c = backends.which(op, dev, _dtype(dt), backend=impl, needs_grad=want_grad,
                                           facts=case.facts)
                        if c.name != impl:             # a shape limit of this implementation
                            refused.append(f"{case.name}: {'; '.join(c.reasons.get(impl) or ['refused'])}")
                            continue
                        row = check_case(case, impl, dev, dt, want_grad)
                        ran += 1
                        rows.append(row)
                        if progress:
                            progress(row)
                    if refused and (not quick or not ran):
                        rows.append(Row("op", op, impl, dev, dt, "-", "skip", detail=" | ".join(refused)))
    return rows


# ---------------------------------------------------------------------------------------------
# the patched model

def tiny_hf(seed: int = 0):
    """A tiny Hugging Face SegFormer (4 stages 8/16/24/32, one block each), eval, realistic scale."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from .testing import init_realistic_

    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2],
                          decoder_hidden_size=32, num_labels=5)
    torch.manual_seed(seed)
    return init_realistic_(SegformerForSemanticSegmentation(cfg), seed=seed).eval()


def model_backends(device: str, impls=None) -> tuple[list[str], list[Row]]:
    """Backends a whole model can be patched with here (every op runnable under it, fp32
    inference), and skip rows for the others."""
    import torch

    from . import backends

    ok, skipped = ["auto"], []
    for name in backends.PRIORITY:
        if impls and name not in impls:
            continue
        missing = []
        for op in backends.ops():
            c = backends.which(op, device, torch.float32, backend=name)
            if c.name is None:
                missing.append(f"{op}: {'; '.join(c.reasons.get(name) or ['no implementation'])}")
        if missing:
            skipped.append(Row("model", "tiny HF SegFormer", name, device, "fp32", "-", "skip",
                               detail=" | ".join(missing)))
        else:
            ok.append(name)
    return ok, skipped


def model_rows(impls=None, devs=None, progress=None, size=(61, 67)) -> list[Row]:
    """Tiny HF SegFormer patched with each runnable backend vs stock: max|patched - stock| /
    max|stock| <= 1e-4 on the logits, fp32, eval, an odd input size."""
    import torch

    rows = []
    # fp32 means fp32: no TF32 convolutions (cuDNN's default) on either side of the comparison
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _model_rows(rows, impls, devs, progress, size)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _model_rows(rows, impls, devs, progress, size):
    import copy

    import torch

    import segformer_fast

    try:
        stock = tiny_hf()
    except ImportError as e:
        return [Row("model", "tiny HF SegFormer", "-", "-", "fp32", "-", "skip", detail=f"transformers: {e}")]
    for dev in devs or devices()[:1]:
        names, skipped = model_backends(dev, impls)
        rows += skipped
        base = copy.deepcopy(stock).to(dev)
        x = torch.randn(2, 3, *size, generator=_gen(7)).to(dev)
        with torch.no_grad():
            want = base(pixel_values=x).logits
        for name in names:
            t0 = time.perf_counter()
            row = Row("model", "tiny HF SegFormer", name, dev, "fp32", f"B2 {size[0]}x{size[1]} eval", "ok")
            try:
                patched = copy.deepcopy(base)
                report = segformer_fast.patch(patched, backend=name)
                with torch.no_grad():
                    got = patched(pixel_values=x).logits
                err = ((got - want).abs().max() / want.abs().max()).item()
                row.worst = err / MODEL_RTOL if math.isfinite(err) else math.inf
                row.detail = f"{len(report.replaced)} modules replaced; max|patched-stock|/max|stock| = {err:.2e}"
                if report.skipped or not row.worst <= 1:
                    row.status = "FAIL"
                    if report.skipped:
                        row.detail += f"; skipped {report.skipped}"
            except Exception as e:
                row.status, row.detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row.seconds = time.perf_counter() - t0
            rows.append(row)
            if progress:
                progress(row)
    return rows


# ---------------------------------------------------------------------------------------------
# report

def format_row(r: Row) -> str:
    worst = "-" if r.worst is None else f"{r.worst:.3f}"
    mode = "fwd+bwd" if r.backward else "fwd"
    text = (f"| {r.status:<4} | {r.op} | {r.impl} | {r.device} | {r.dtype} | {r.case} | {mode} | {worst} | "
            f"{r.seconds:.1f} s |")
    return text + (f" {r.detail}" if r.status == "FAIL" or r.kind == "model" else "")


def table(rows: list[Row]) -> str:
    """Markdown table of the checked rows, then the skipped combinations grouped with their reasons."""
    lines = ["| status | op | impl | device | dtype | case | checked | worst err/bound | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(r) for r in rows if r.status != "skip"]
    skips: dict[tuple, list[str]] = {}
    for r in rows:
        if r.status == "skip":
            skips.setdefault((r.op, r.impl, r.device, r.detail), []).append(r.dtype)
    if skips:
        lines += ["", "not available here (not failures):"]
        lines += [f"- {op} [{impl}] on {dev} ({', '.join(dts)}): {why}" for (op, impl, dev, why), dts in skips.items()]
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    """1 if any row failed (or nothing at all was checked), else 0."""
    if any(r.status == "FAIL" for r in rows):
        return 1
    return 0 if any(r.status == "ok" for r in rows) else 1


def summary(rows: list[Row]) -> str:
    ok = sum(r.status == "ok" for r in rows)
    bad = [r for r in rows if r.status == "FAIL"]
    skip = sum(r.status == "skip" for r in rows)
    return f"selfcheck: {ok} passed, {len(bad)} failed, {skip} not available here" + (
        "" if not bad else "\nFAILED: " + "; ".join(f"{r.op}[{r.impl}] {r.device} {r.dtype} {r.case}" for r in bad))


def run(quick: bool = False, ops=None, impls=None, dtypes=DTYPES, model: bool = True,
        progress: Callable[[Row], None] | None = None) -> list[Row]:
    """All op rows, then the model rows (see the module docstring)."""
    rows = op_rows(ops, impls, dtypes, quick, progress=progress)
    if model:
        rows += model_rows(impls, progress=progress)
    return rows


def add_arguments(p) -> None:
    """The ``selfcheck`` subcommand's options."""
    p.add_argument("--quick", action="store_true", help="one shape per op; fp16/bf16 forward only (< 5 min on 2 cores)")
    p.add_argument("--ops", type=lambda s: s.split(","), help="only these ops, e.g. dwconv_gelu,upsample_sum")
    p.add_argument("--backends", type=lambda s: s.split(","), help="only these implementations, e.g. triton,cuda")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES), help="default fp32,fp16,bf16")
    p.add_argument("--no-model", action="store_true", help="skip the patched-model check")
    p.add_argument("--json", help="also write the rows as JSON here")


def _announce_builds(impls) -> None:
    """Say so before a first native build (the emulated CUDA build takes ~80 s once)."""
    from .info import builds
    from .kernels.cuda import emulating

    for b in builds():
        if b["built"] or b.get("error"):
            continue
        if b["name"] == "segformer_fast_cpu" and (not impls or "cpu" in impls):
            print("selfcheck: building the native CPU kernels once (~30 s; cached afterwards)...", flush=True)
        if b["name"] == "segformer_fast_cuda_emu" and emulating() and (not impls or "cuda" in impls):
            print("selfcheck: building the CUDA kernels for the CPU emulation once (~80 s; cached "
                  "afterwards)...", flush=True)


def main(args) -> int:
    """``python -m segformer_fast selfcheck``: print the table; exit 1 on any failure."""
    import json

    child = in_fresh_process_with(cpu_environment(), args.argv)
    if child is not None:
        return child
    _announce_builds(args.backends)
    t0 = time.perf_counter()
    done: list[Row] = []

    def write(rows, final):
        if args.json:      # rewritten after every row: a run cut short still leaves its results
            with open(args.json, "w") as f:
                json.dump({"rows": [asdict(r) for r in rows], "complete": final,
                           "exit_code": exit_code(rows) if final else None,
                           "seconds": time.perf_counter() - t0}, f, indent=1)

    def progress(row):
        done.append(row)
        print(format_row(row), flush=True)
        write(done, False)

    rows = run(args.quick, args.ops, args.backends, args.dtypes, not args.no_model, progress=progress)
    print()
    print(table(rows))
    print()
    print(summary(rows) + f" ({time.perf_counter() - t0:.0f} s)")
    write(rows, True)
    return exit_code(rows)
