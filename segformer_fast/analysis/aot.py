"""Ahead-of-time compile report of the Triton kernels, derived from the launchers themselves.

Nothing here lists kernel arguments or configurations. ``record_launches`` stands in for
``kernel[grid](...)`` (it replaces ``JITFunction.run``, which every launch goes through) while the
real launchers of ``kernels/triton/`` run on meta tensors (shapes, dtypes and strides, no data, no
device) at SegFormer's shapes; each recorded launch is then specialised by Triton's own binder for
a ``GPUTarget`` (argument types, 16-divisibility of pointers and integers, integers equal to 1,
constexprs, num_warps/num_stages) and compiled, exactly as Triton would compile that launch on
sm_80/sm_90. Registers and spills are read from the log of Triton's own ``ptxas -v`` (its flags,
its ptxas), shared memory from Triton's metadata. Identical compiles are done once, in a fresh
Triton cache (a cached kernel would skip ptxas and leave no log).

Must run where TRITON_INTERPRET is off when the kernel modules are imported (interpreted
``@triton.jit`` functions cannot be lowered): ``python -m segformer_fast kernels`` re-runs itself
in a subprocess with TRITON_INTERPRET=0 when it is set.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

SMEM_LIMIT = 100 * 1024     # DESIGN.md: <= 100 KB, leaving room for two programs per SM on sm_80

# SegFormer variants (DESIGN.md): stage widths, decoder width. Heads, sr ratios, the Mix-FFN ratio
# and the patch convs are the same for all; depth only repeats identical launches.
VARIANTS = {"b0": ((32, 64, 160, 256), 256), "b1": ((64, 128, 320, 512), 256),
            **{f"b{i}": ((64, 128, 320, 512), 768) for i in range(2, 6)}}
HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL = dict(variants=tuple(VARIANTS), sizes=((512, 512), (1024, 2048)), dtypes=tuple(DTYPES),
            archs=(80, 90), batches=(1, 8))
# Every kernel of the four ops, each at the two distinct widths it sees (B0, B2), in the
# 16-bit and fp32 code paths: what tests/test_kernels_aot.py compiles.
QUICK = dict(variants=("b0", "b2"), sizes=((512, 512),), dtypes=("fp16", "fp32"), archs=(80, 90),
             batches=(1,))


# ----------------------------------------------------------------------------------------------
# Recording: what the launchers launch
# ----------------------------------------------------------------------------------------------

@dataclass
class Launch:
    fn: object                  # the @triton.jit JITFunction
    args: tuple
    kwargs: dict
    case: str = ""              # which model call launched it (for the report)


@contextlib.contextmanager
def record_launches():
    """Within the block, ``kernel[grid](*args, **kwargs)`` launches nothing and appends a
    ``Launch`` to the yielded list instead."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compiles need TRITON_INTERPRET=0 (interpreted kernels cannot "
                           "be lowered): run `python -m segformer_fast kernels`")
    launches: list[Launch] = []
    real = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = real


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def _tokens_as_image(x, h, w):
    """(B, h*w, C) tokens -> the (B, C, h, w) channels-last view the ops layer passes."""
    return x.view(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def segformer_launches(variant: str, size: tuple[int, int], dtype: torch.dtype, batch: int = 1) -> list[Launch]:
    """Every Triton launch of one training step (forward + backward) of SegFormer-``variant`` at
    ``size``, as the ops layer drives the launchers: per stage the patch embedding and the
    sequence reduction (conv_layernorm), attention over kv halves of one projection, the Mix-FFN
    dwconv + GELU; the decode head's upsample-sum with the eval epilogue (bias, folded BatchNorm,
    ReLU) and in training (bias only), each with its backward."""
    from ..kernels.triton import conv_layernorm as cl
    from ..kernels.triton import dwconv_gelu as dw
    from ..kernels.triton import sra_attention as sa
    from ..kernels.triton import upsample_sum as us
    from .decode_head import stage_sizes

    dims, D = VARIANTS[variant]
    hws = stage_sizes(*size)
    B, e = batch, dtype
    out: list[Launch] = []
    with record_launches() as rec:
        def conv_ln(name, x, cin, cout, k, s, p):
            w, vec = _meta(cout, cin, k, k, dtype=e), _meta(cout, dtype=e)
            y = cl.conv_layernorm_fwd(x, w, vec, vec, vec, (s, s), (p, p), 1e-6)
            cl.conv_layernorm_bwd_dz(torch.empty_like(y), x, w, vec, vec, (s, s), (p, p), 1e-6)
            tag(name)

        def tag(name):
            for launch in rec[len(out):]:
                launch.case = name
            out.extend(rec[len(out):])

        x = _meta(B, 3, *size, dtype=e)
        cin = 3
        for i, (C, (h, w)) in enumerate(zip(dims, hws)):
            if i == 0:
                conv_ln("patch_embed1", x, 3, C, 7, 4, 3)
            else:
                prev = _meta(B, hws[i - 1][0] * hws[i - 1][1], cin, dtype=e)
                conv_ln(f"patch_embed{i + 1}", _tokens_as_image(prev, *hws[i - 1]), cin, C, 3, 2, 1)
            cin = C
            tokens = _meta(B, h * w, C, dtype=e)
            sr = SR_RATIOS[i]
            m = (h // sr) * (w // sr)
            if sr > 1:
                conv_ln(f"sr{i + 1}", _tokens_as_image(tokens, h, w), C, C, sr, sr, 0)
            kv = _meta(B, m, 2 * C, dtype=e)
            o, lse = sa.sra_attention_fwd(tokens, kv[..., :C], kv[..., C:], HEADS[i], (C // HEADS[i]) ** -0.5)
            sa.sra_attention_bwd(torch.empty_like(o), tokens, kv[..., :C], kv[..., C:], lse, HEADS[i],
                                 (C // HEADS[i]) ** -0.5)
            tag(f"attention{i + 1}")
            hidden = _meta(B, h * w, MLP_RATIO * C, dtype=e)
            wt, bias = _meta(MLP_RATIO * C, 1, 3, 3, dtype=e), _meta(MLP_RATIO * C, dtype=e)
            y = dw.forward(hidden, h, w, wt, bias, "none")
            dw.backward(torch.empty_like(y), hidden, h, w, wt, bias, "none")
            tag(f"mix_ffn{i + 1}")

        maps = [_meta(B, h * w, D, dtype=e) for h, w in hws]
        vec = _meta(D, dtype=e)
        for mode, params, relu in (("eval", (vec, vec, vec), True), ("train", (vec, None, None), False)):
            y = us.upsample_sum_fwd(maps, hws, hws[0], *params, relu=relu)
            grad = torch.empty_like(y)
            if relu:
                dz = us.epilogue_bwd(grad, maps, hws, hws[0], *params, relu)[0]
            else:
                dz = grad
            for hw in hws[1:]:
                us.upsample_adjoint(dz, hw, hws[0], e)
            tag(f"decode_head.{mode}")

        # post-processing: 150-class logits at the stage-1 grid -> labels at the image size
        from ..kernels.triton import resize_argmax as ra
        H, W = size
        tables = [_meta(n, dtype=dt) for n in (H, W) for dt in (torch.int32, torch.int32, torch.float32,
                                                                 torch.float32)]
        yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1 = tables
        ra.resize_argmax_fwd(_meta(B, 150, *hws[0], dtype=e), yi0, yi1, wy0, wy1, xi0, xi1, wx0, wx1,
                             (H, W), True)
        tag("postprocess")
    return out


# ----------------------------------------------------------------------------------------------
# Compiling one launch as Triton would for a GPU this machine does not have
# ----------------------------------------------------------------------------------------------

@dataclass
class Compiled:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict
    pointer_types: str          # the kernel's pointer argument types, e.g. "fp16,fp32"
    specialised: str            # integer arguments Triton specialised: "N,C%16 sxc=1"
    registers: int = 0
    spills: int = 0             # bytes: spill stores + spill loads
    shared_bytes: int = 0
    seconds: float = 0.0
    cases: list = field(default_factory=list)   # "b0 512x512 fp16 batch 1: attention1", ...

    def config(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{ce} warps={self.num_warps} stages={self.num_stages}"


def _specialise(launch: Launch, arch: int):
    """Triton's own argument specialisation for ``sm_{arch}``: (signature, constexprs, attrs,
    options), what ``JITFunction.run`` would hand to the compiler for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound,
                                                          specialization, options)
    return signature, constexprs, attrs, options


def _key(launch: Launch, arch: int) -> tuple:
    signature, constexprs, attrs, options = _specialise(launch, arch)
    return (launch.fn.__name__, arch, tuple(signature.items()), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), options.num_warps, options.num_stages)


_logs = threading.local()
_ptxas_log: dict[str, str] = {}     # compiled kernel hash -> the ptxas -v log of its compile


class _KeepPtxasLog:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA backend: runs every command
    as the real one does and keeps, for the calling thread, the log that Triton's ``ptxas -v``
    writes to the file it passes as stderr (Triton 3.6-3.9 all call it that way)."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        res = subprocess.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if "-v" in cmd and hasattr(err, "name"):
            with open(err.name) as f:
                _logs.ptxas = f.read()
        return res


@contextlib.contextmanager
def _compiling():
    """Fresh Triton cache and ptxas logs kept, for the duration of the block."""
    import triton.backends.nvidia.compiler as nv

    real, saved = nv.subprocess, os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="segformer_fast_aot_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        nv.subprocess = _KeepPtxasLog()
        try:
            yield
        finally:
            nv.subprocess = real
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def _leaves(t) -> list:
    """The scalar types of a (possibly nested, for tuple arguments) signature entry."""
    return [x for y in t for x in _leaves(y)] if isinstance(t, tuple) else [t]


def _arg_name(names: list[str], path: tuple) -> str:
    """A Triton argument path as the kernel's source names it: ``geom[1][0]`` for (1, 1, 0)."""
    return names[path[0]] + "".join(f"[{i}]" for i in path[1:])


def _arg_type(signature: dict, names: list[str], path: tuple) -> str:
    t = signature[names[path[0]]]
    for i in path[1:]:
        t = t[i]
    return t


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile ``launch`` for ``sm_{arch}`` and read its resources (registers, spills, shared).
    Call inside ``_compiling()``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    signature, constexprs, attrs, options = _specialise(launch, arch)
    src = ASTSource(launch.fn, signature, constexprs, attrs)
    _logs.ptxas = None
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    # a kernel compiled earlier in this cache (the same launch twice) comes back without ptxas
    log = _ptxas_log.setdefault(compiled.hash, _logs.ptxas or "")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v log for {launch.fn.__name__} (compiled from a cache?):\n{log}")
    names = [p.name for p in launch.fn.params]
    blocks = {names[path[0]]: v for path, v in constexprs.items()
              if names[path[0]].startswith(("BLOCK", "HEAD_DIM"))}
    ptrs = sorted({t[1:] for t in _leaves(tuple(signature.values())) if t.startswith("*")})
    div = [_arg_name(names, path) for path, a in attrs.items()
           if a and _arg_type(signature, names, path) in ("i32", "i64")]
    ones = [_arg_name(names, path) for path in constexprs if not launch.fn.params[path[0]].is_constexpr]
    spec = " ".join(filter(None, [",".join(div) + "%16" if div else "", ",".join(ones) + "=1" if ones else ""]))
    return Compiled(launch.fn.__name__, arch, options.num_warps, options.num_stages, blocks, ",".join(ptrs), spec,
                    int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)),
                    int(compiled.metadata.shared), time.perf_counter() - t0)


def kernel_report(variants, sizes, dtypes, archs=(80, 90), batches=(1,), workers: int = 2,
                  progress=None) -> list[Compiled]:
    """Every distinct compile that SegFormer ``variants`` x ``sizes`` x ``dtypes`` x ``batches``
    launch, for each arch; one ``Compiled`` per distinct compile, with the cases that need it."""
    from concurrent.futures import ThreadPoolExecutor

    unique: dict[tuple, tuple[Launch, list]] = {}
    for v in variants:
        for size in sizes:
            for dt in dtypes:
                for batch in batches:
                    for launch in segformer_launches(v, tuple(size), DTYPES[dt], batch):
                        case = f"{v} {size[0]}x{size[1]} {dt} batch {batch}: {launch.case}"
                        for arch in archs:
                            unique.setdefault(_key(launch, arch), (launch, []))[1].append(case)
    if progress:
        progress(f"{len(unique)} distinct compiles")
    jobs = [(launch, key[1], cases) for key, (launch, cases) in unique.items()]

    def one(job):
        launch, arch, cases = job
        c = compile_launch(launch, arch)
        c.cases = cases
        return c

    # Triton runs ptxas as a subprocess: two compiles overlap.
    with _compiling(), ThreadPoolExecutor(max(1, workers)) as ex:
        return sorted(ex.map(one, jobs), key=lambda c: (c.kernel, c.pointer_types, c.config(), c.specialised, c.arch))


def format_report(rows: list[Compiled]) -> str:
    lines = ["| kernel | pointers | config | specialised | arch | registers | spills (B) | shared (B) | used by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        used = r.cases[0] + (f" (+{len(r.cases) - 1})" if len(r.cases) > 1 else "")
        lines.append(f"| {r.kernel} | {r.pointer_types} | {r.config()} | {r.specialised} | sm_{r.arch} | {r.registers} | "
                     f"{r.spills} | {r.shared_bytes} | {used} |")
    return "\n".join(lines)


def problems(rows: list[Compiled]) -> list[str]:
    """What makes the report fail: any spill, shared memory over SMEM_LIMIT."""
    out = []
    for r in rows:
        if r.spills:
            out.append(f"{r.kernel} [{r.config()}] sm_{r.arch} {r.pointer_types}: {r.spills} B spilled")
        if r.shared_bytes > SMEM_LIMIT:
            out.append(f"{r.kernel} [{r.config()}] sm_{r.arch} {r.pointer_types}: {r.shared_bytes} B shared")
    return out


def main(args) -> int:
    """``python -m segformer_fast kernels``: see ``segformer_fast.__main__``."""
    import json

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # kernel modules decide interpreted vs compiled at import: start a clean process
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "segformer_fast"] + args.argv, env=env)
    # Triton 3.9 warns when unset; its GPU default (FMA contraction on) is what launches get
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    spec = dict(QUICK if args.quick else FULL)
    for name in ("variants", "dtypes", "archs", "batches"):
        if getattr(args, name, None):
            spec[name] = tuple(getattr(args, name))
    if args.sizes:
        spec["sizes"] = tuple(tuple(s) for s in args.sizes)
    t0 = time.perf_counter()
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"triton {triton.__version__}: compiling the launches of " + ", ".join(
        f"{k}={','.join(map(str, v))}" for k, v in spec.items()))
    rows = kernel_report(**spec, workers=args.workers, progress=say)
    elapsed = time.perf_counter() - t0
    print(format_report(rows))
    bad = problems(rows)
    kernels = sorted({r.kernel for r in rows})
    print(f"\n{len(rows)} compiles of {len(kernels)} kernels in {elapsed:.0f} s (triton {triton.__version__}); "
          f"max registers {max(r.registers for r in rows)}, max shared {max(r.shared_bytes for r in rows)} B, "
          f"{sum(r.spills for r in rows)} B spilled")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, seconds=elapsed, spec={k: list(v) for k, v in spec.items()},
                           rows=[r.__dict__ for r in rows]), f, indent=1)
    for p in bad:
        print("FAIL " + p)
    return 1 if bad else 0
