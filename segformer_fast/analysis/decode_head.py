"""Cost of SegFormer's All-MLP head: stock (concat + 1x1 ``linear_fuse`` at H/4) vs folded
(``linear_fuse`` reassociated into the per-stage projections + the fused upsample-sum kernel).

- ``head_cost(...)``: analytic HBM bytes and FLOPs of one head forward, every intermediate write
  and read of the stock sequence counted (layout copies included), as ``roofline.compare``.
- ``flop_table(...)``: measured FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of whole
  SegFormer B0-B5 models (``segformer_fast.models.segformer``) before and after patching only the
  decode head with ``segformer_fast.patch``.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .roofline import Cost, compare

__all__ = ["head_cost", "flop_table", "stage_sizes"]

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def stage_sizes(H: int, W: int) -> list[tuple[int, int]]:
    """Feature sizes of the 4 MiT stages for an H x W image (k7 s4 p3, then k3 s2 p1 convs)."""
    h, w = (H + 2 * 3 - 7) // 4 + 1, (W + 2 * 3 - 7) // 4 + 1
    out = [(h, w)]
    for _ in range(3):
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
        out.append((h, w))
    return out


def head_cost(batch: int, H: int, W: int, dims: Sequence[int], D: int, num_classes: int = 150,
              dtype: torch.dtype = torch.float32) -> dict:
    """Forward HBM traffic and FLOPs of the head for an H x W image: stock vs folded + fused.

    Stock (NVlabs/HF): per stage linear (read x_i, write y_i), the (B, HW, D) -> NCHW reshape copy
    (read + write), bilinear upsample of stages 2-4 (read, write at H/4), concat (read 4 maps,
    write 4D channels), 1x1 fuse conv (read 4D, write D), BatchNorm (read, write), ReLU (in place:
    read, write), classifier (read D, write K). Folded: per stage GEMM with the folded D x C_i
    weight (read x_i, write map_i), one upsample-sum pass (read the maps, write D at H/4 once),
    classifier. Weights are counted once; the eval-mode fold is cached so it costs nothing per call.
    """
    e = _BYTES.get(dtype, 4)
    sizes = stage_sizes(H, W)
    n1 = sizes[0][0] * sizes[0][1] * batch
    ns = [h * w * batch for h, w in sizes]
    n_stage = len(dims)
    feat = sum(n * c for n, c in zip(ns, dims))              # encoder features read
    maps = sum(n * D for n in ns)                             # low-res D-channel maps
    w_proj = sum(c * D for c in dims)
    proj_flops = sum(2 * n * c * D for n, c in zip(ns, dims))
    cls_flops = 2 * n1 * D * num_classes
    full = n1 * D                                              # one D-channel map at H/4
    ref_bytes = e * (feat + maps                              # linear_c: read x, write y
                     + 2 * maps                               # reshape copy to NCHW
                     + sum(ns[1:]) * D + (n_stage - 1) * full  # upsample: read low-res, write H/4
                     + 2 * n_stage * full                     # concat: read 4 maps, write 4D
                     + n_stage * full + full                  # fuse conv: read 4D, write D
                     + 2 * full + 2 * full                    # BatchNorm, ReLU
                     + full + n1 * num_classes                # classifier
                     + w_proj + n_stage * D * D + D * num_classes)
    ref_flops = (proj_flops + 2 * n1 * n_stage * D * D        # projections + linear_fuse
                 + 11 * (n_stage - 1) * full                  # bilinear: 4 weights x 2 ops + idx
                 + 4 * full + full + cls_flops)               # BN (2 ops + stats), ReLU, classifier
    fused_bytes = e * (feat + maps                            # folded GEMMs: read x, write map
                       + maps + full                          # upsample-sum: read maps, write once
                       + full + n1 * num_classes              # classifier
                       + w_proj + D * num_classes)
    fused_flops = (proj_flops + 8 * (n_stage - 1) * full + (n_stage - 1) * full
                   + 4 * full + cls_flops)                     # stencils, sum, bias/affine/ReLU
    return compare(Cost("stock head (concat + linear_fuse at H/4)", ref_bytes, ref_flops),
                   Cost("folded head + fused upsample-sum", fused_bytes, fused_flops))


@contextlib.contextmanager
def _no_init():
    """Skip weight initialisation while building a model whose values do not matter (FLOP
    counting): the init functions dominate building B5 on a CPU."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "zeros_", "ones_",
             "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _count(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    total = counter.get_total_flops()
    per_module = counter.get_flop_counts()
    head = sum(sum(counts.values()) for name, counts in per_module.items()
               if name.endswith(".decode_head"))
    return total, head


def flop_table(variants: Sequence[str] = ("b0", "b1", "b2", "b3", "b4", "b5"), size: int = 512,
               num_classes: int = 150, batch: int = 1, device: str = "meta") -> list[dict]:
    """Measured FLOPs (FlopCounterMode, eval, batch ``batch``) of SegFormer ``variants`` at
    ``size`` x ``size``: whole model and decode head, before and after patching only the decode
    head with ``segformer_fast.patch`` (steady state: the folded weights are cached after one call).
    Runs on the meta device by default: FLOPs depend on shapes only."""
    from ..models import segformer
    from ..patch import patch

    rows = []
    # shapes are all FlopCounterMode needs: build and run on the meta device (no data, instant)
    with torch.device(device):
        x = torch.zeros(batch, 3, size, size)
    for v in variants:
        with _no_init():
            model = segformer(v, num_classes).eval().to(device)
        before, head_before = _count(model, x)
        patch(model.decode_head, backend="torch")
        with torch.no_grad():
            dims = model.backbone.embed_dims
            model.decode_head([torch.zeros(batch, c, h, w, device=device) for c, (h, w) in
                               zip(dims, stage_sizes(size, size))])  # fill the fold cache
        after, head_after = _count(model, x)
        rows.append({"variant": v.upper(), "size": size, "gflops_before": before / 1e9,
                     "gflops_after": after / 1e9, "ratio": after / before,
                     "head_gflops_before": head_before / 1e9, "head_gflops_after": head_after / 1e9})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``flop_table`` rows (FLOPs = 2 x multiply-adds, as FlopCounterMode)."""
    lines = ["| model | input | GFLOPs stock | GFLOPs folded head | ratio | head stock | head folded |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['size']}² | {r['gflops_before']:.2f} | {r['gflops_after']:.2f} | "
                     f"{r['ratio']:.3f} | {r['head_gflops_before']:.2f} | {r['head_gflops_after']:.2f} |")
    return "\n".join(lines)
