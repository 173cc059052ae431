"""Ahead-of-time compile of every Triton kernel of the four ops for sm_80 and sm_90, exactly as the
launchers launch them at SegFormer shapes (``python -m segformer_fast kernels --quick``: B0 and B2
at 512x512, fp16 and fp32; segformer_fast/analysis/aot.py records the launches). Runs in a
subprocess with TRITON_INTERPRET=0: kernels imported under the interpreter cannot be lowered."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

KERNELS = {
    "_sra_fwd_kernel", "_sra_bwd_dq_kernel", "_sra_bwd_dkdv_kernel",             # sra_attention
    "_conv_ln_fwd_kernel", "_conv_ln_bwd_kernel",                                 # conv_layernorm
    "_fwd_kernel", "_bwd_act_kernel", "_bwd_conv_kernel", "_reduce_kernel",       # dwconv_gelu
    "_upsample_sum_fwd_kernel", "_epilogue_bwd_kernel", "_upsample_adjoint_kernel",  # upsample_sum
    "_resize_argmax_kernel",                                                      # resize_argmax
}


@pytest.mark.slow
def test_quick_sweep_compiles_every_kernel_without_spills(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "segformer_fast", "kernels", "--quick", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=1500)
    print(r.stdout[-6000:])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["arch"] for row in rows} == {80, 90}
    for row in rows:
        assert row["spills"] == 0, row
        assert row["shared_bytes"] <= 100 * 1024, row
        assert 0 < row["registers"] <= 255, row
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
