"""The README's main command and the other CLI verbs, run as a user runs them (small sizes)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)      # a user's shell: the CPU path, not the interpreter
    r = subprocess.run([sys.executable, "-m", "segformer_fast", *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_demo():
    out = run("demo", "--size", "128", "--rounds", "2")
    assert "parity: logits (1, 150, 32, 32)" in out and "(OK, limit 1e-3)" in out
    assert "patched: 21 modules replaced, 0 skipped" in out
    assert "speed-up" in out


def test_profile():
    out = run("profile", "--size", "64", "--rounds", "1", "--top", "3")
    assert out.count("| op | calls/forward | ms/forward | share |") == 2


def test_bench_table(tmp_path):
    rows = [{"name": f"test_x[{impl}]", "group": None, "params": {"impl": impl, "shape": "s"},
             "extra_info": {}, "stats": {"median": t}} for impl, t in (("reference", 0.004), ("fused", 0.001))]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": rows, "machine_info": {"cpu": {"brand_raw": "cpu"}},
                                "datetime": "now"}))
    out = run("bench", str(path))
    assert "| test_x[shape=s] | fused | 1.00 ms | 4.00x |" in out


def test_contenders_names_are_checked():
    from segformer_fast import contenders

    runs, x = contenders.contenders("b0", 64, engines=False)
    assert set(runs) == {"hf_sdpa", "patched_fp32", "patched_bf16_autocast"} <= set(contenders.NAMES)
    # a misspelt --only fails loudly instead of printing a table without the contender
    with pytest.raises(SystemExit) as e:
        contenders.main(["--only", "openvino"])
    assert e.value.code == 2
