"""``info``, ``selfcheck`` and ``gpu-report`` (segformer_fast/info.py, selfcheck.py, gpu_report.py),
run as a user runs them, plus their table / exit logic with planted failures.

CPU cost (2 cores): info ~6 s, selfcheck --quick ~35 s (the first run on a machine also builds the
CUDA emulation, ~60-80 s, cached), gpu-report --dry-run with the sanitizer and op-benchmark steps
~30 s (the full dry run, torch.compile of the tiny model included, takes ~6 min: not run here), the
model benchmark's eager rows in process ~10 s.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from segformer_fast import backends, gpu_report, selfcheck  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=600, env_extra=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)                # a user's shell: the CLI must arrange it itself
    env.pop("SEGFORMER_FAST_CUDA_EMULATE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "segformer_fast", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_info_names_every_op_and_build(tmp_path):
    r = cli("info", "--json", str(tmp_path / "info.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for op in backends.ops():
        assert f"  {op} " in r.stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert set(info["dispatch"]) == set(backends.ops())
    for op, rows in info["dispatch"].items():
        for key, row in rows.items():     # what info reports is what which() answers
            dt, mode = key.split()
            c = backends.which(op, "cuda" if torch.cuda.is_available() else "cpu",
                               {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt],
                               backend="auto", needs_grad=mode == "training")
            assert row["auto"] == c.name, (op, key)
    assert [b["name"] for b in info["builds"]] == ["segformer_fast_cpu", "segformer_fast_cuda_emu",
                                                   "segformer_fast_cuda"]
    assert "versions:" in r.stdout and "torch" in info["versions"] and "nvcc" in info["versions"]


def test_info_build_dirs_are_the_loaded_builds():
    """info mirrors the build arguments of kernels/cpu.py and kernels/cuda.py: the directories it
    reports must be where the builds really load from."""
    from segformer_fast import info
    from segformer_fast.kernels import cpu

    dirs = {b["name"]: b for b in info.builds()}
    assert Path(cpu.native().__file__).parent == Path(dirs["segformer_fast_cpu"]["dir"])
    assert dirs["segformer_fast_cpu"]["built"]
    emu = dirs["segformer_fast_cuda_emu"]
    if emu["built"]:          # selfcheck --quick below builds it on a fresh machine
        from segformer_fast.kernels import cuda
        assert Path(cuda.emulated_build().__file__).parent == Path(emu["dir"])


def test_selfcheck_quick_passes(tmp_path):
    r = cli("selfcheck", "--quick", "--json", str(tmp_path / "sc.json"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "sc.json").read_text())["rows"]
    ok = {(x["op"], x["impl"]) for x in rows if x["status"] == "ok"}
    for op in selfcheck._CASES:           # every op on every implementation it declares runs here
        for impl in selfcheck.implementations(op, "cpu"):
            runs = [backends.which(op, "cpu", dt, backend=impl) for dt in (torch.float32, torch.bfloat16)]
            if any(c.name == impl and c.same_as is None for c in runs):   # (cpu attention: bf16 only)
                assert (op, impl) in ok, (op, impl)
    assert ("tiny HF SegFormer", "triton") in ok and ("tiny HF SegFormer", "auto") in ok
    assert "0 failed" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


def _planted(op, impl, fn):
    """``backends``' registry with ``op``'s ``impl`` replaced by ``fn`` (what dispatch calls)."""
    return tuple(dataclasses.replace(i, run=fn) if i.name == impl else i for i in backends._OPS[op])


def _quick_fp32_rows(monkeypatch, op, wrap):
    """selfcheck --quick fp32 rows of ``op`` on torch (its run wrapped by ``wrap``) and reference."""
    real = next(i for i in backends._OPS[op] if i.name == "torch").run
    monkeypatch.setitem(backends._OPS, op, _planted(op, "torch", wrap(real)))
    return selfcheck.run(quick=True, ops=[op], impls=["torch", "reference"], dtypes=("fp32",), model=False)


def test_selfcheck_fails_on_a_wrong_implementation(monkeypatch):
    rows = _quick_fp32_rows(monkeypatch, "dwconv_gelu", lambda real: lambda *a: real(*a) * 1.001)
    by = {r.impl: r for r in rows if r.status != "skip"}
    assert by["torch"].status == "FAIL" and "max|out-ref|" in by["torch"].detail
    assert by["reference"].status == "ok"
    assert selfcheck.exit_code(rows) == 1
    assert "| FAIL | dwconv_gelu | torch |" in selfcheck.table(rows)
    assert selfcheck.exit_code([r for r in rows if r.impl == "reference"]) == 0


def test_selfcheck_resize_argmax_checks_labels_not_only_scores(monkeypatch):
    def wrong_labels(real):
        def run(*args):
            labels, scores = real(*args)
            return (labels + 1) % 19, scores            # right scores, wrong classes
        return run
    by = {r.impl: r for r in _quick_fp32_rows(monkeypatch, "resize_argmax", wrong_labels) if r.status != "skip"}
    assert by["torch"].status == "FAIL" and "labels differ" in by["torch"].detail
    assert by["reference"].status == "ok"


def test_selfcheck_fails_on_a_crash_and_on_nothing_checked(monkeypatch):
    def boom(*args):
        raise RuntimeError("illegal memory access")
    monkeypatch.setitem(backends._OPS, "upsample_sum", _planted("upsample_sum", "torch", boom))
    rows = selfcheck.run(quick=True, ops=["upsample_sum"], impls=["torch"], dtypes=("fp16",), model=False)
    assert [r.status for r in rows] == ["FAIL"] and "illegal memory access" in rows[0].detail
    assert selfcheck.exit_code(rows) == 1
    assert selfcheck.exit_code([]) == 1               # a check that checked nothing did not pass


def test_patched_model_row_fails_when_the_model_differs(monkeypatch):
    real = next(i for i in backends._OPS["upsample_sum"] if i.name == "reference").run
    monkeypatch.setitem(backends._OPS, "upsample_sum",
                        _planted("upsample_sum", "reference", lambda *a: real(*a) + 1e-2))
    rows = selfcheck.model_rows(impls=["reference"], devs=["cpu"])
    bad = {r.impl: r for r in rows if r.status == "FAIL"}
    assert "reference" in bad and "max|patched-stock|" in bad["reference"].detail


def test_gpu_report_dry_run_writes_json_and_summary(tmp_path):
    out = tmp_path / "report"
    r = cli("gpu-report", "--dry-run", "--out", str(out), "--steps", "sanitizer,op_bench", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["dry_run"] and rep["steps"]["sanitizer"]["status"] == "ok"
    assert rep["steps"]["op_bench"]["status"] == "ok" and rep["steps"]["selfcheck"]["status"] == "not requested"
    ops_rows = json.loads((out / "op_bench.json").read_text())["rows"]
    timed = {(x["op"], x["impl"]) for x in ops_rows if "median_s" in x}
    # the four fused ops (resize_argmax is timed by benchmarks/bench_postprocess.py)
    for op in ("sra_attention", "dwconv_gelu", "conv_layernorm", "upsample_sum"):
        assert (op, "triton") in timed and (op, "torch") in timed
    assert all(x["pct_roofline"] is None for x in ops_rows)       # no GPU: no roofline percentage
    san = json.loads((out / "sanitizer.json").read_text())["runs"][0]
    assert {c.split()[0] for c in san["cases_ok"]} == {op for op in selfcheck._CASES
                                                     if "cuda" in selfcheck.implementations(op, "cpu")}
    md = (out / "summary.md").read_text()
    assert gpu_report.DRY_RUN_LABEL in md and "## op benchmarks" in md and "## compute-sanitizer" in md


def test_gpu_report_refuses_without_gpu_unless_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = cli("gpu-report", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--dry-run" in r.stderr


def test_model_bench_eager_rows_in_process(tmp_path, monkeypatch):
    """The model benchmark's code path (build, patch, time, parity vs HF) on the tiny model."""
    monkeypatch.setenv("SEGFORMER_FAST_CUDA_EMULATE", "1")
    monkeypatch.setattr(gpu_report, "MODEL_IMPLS", ("hf_sdpa", "patched_cuda"))
    gpu_report.bench_models(tmp_path, dry_run=True)
    rows = [x for x in gpu_report._read_jsonl(tmp_path / "models_bench.jsonl") if x["event"] == "done"]
    assert [x["impl"] for x in rows] == ["hf_sdpa", "patched_cuda"]
    assert all("error" not in x and x["median_s"] > 0 for x in rows), rows
    assert rows[1]["rel_err_vs_hf"] < 1e-4


def test_summary_of_a_cut_run_and_budget(tmp_path):
    """A budget already spent skips every step cleanly (exit 0, summary written)."""
    code = gpu_report.run_report(tmp_path, dry_run=True, budget_min=0.1, steps=("op_bench", "model_bench"))
    rep = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    assert rep["steps"]["op_bench"]["status"] == "skipped (budget)"
    assert "skipped (budget)" in (tmp_path / "summary.md").read_text()
