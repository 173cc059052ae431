"""Whole-model benchmarks: HF SegFormer unpatched (SDPA attention), torch.compile of it, and
patched by segformer_fast — forward and forward+backward; on CPU also both exported to ONNX and
run by ONNX Runtime (``ort_stock`` vs ``ort_patched``: the folded decoder travels with the export).

CPU (here): B0/B1/B2 at 512², batch 1, fp32; the patched model under bf16 autocast; OpenVINO fp32
and at its default precision and ONNX Runtime when installed (``.[bench]``); the contender rows at
B0 and B2 512² and B0 1024² (``python -m segformer_fast.contenders`` times the same rows interleaved). CUDA: B0-B5 at 512², 1024², 1024x2048, batch 1 and
8, fp16/bf16 (skipped without a GPU). Compare rows of one run as ratios; the JSON under
benchmarks/results/ records device and versions.
"""
import copy

import pytest
import torch

import segformer_fast
from segformer_fast.bench import hf_segformer, versions

CUDA = torch.cuda.is_available()
IMPLS = ["hf_sdpa", "hf_compile", "patched"]

_cache = {}


def build(variant, impl, device, dtype):
    key = (variant, impl, device, dtype)
    if key not in _cache:
        base = _cache.setdefault((variant, "base", device, dtype),
                                 hf_segformer(variant).to(device=device, dtype=dtype))
        model = copy.deepcopy(base)
        if impl == "patched":
            segformer_fast.patch(model)
        elif impl == "hf_compile":
            model = torch.compile(model)
        _cache[key] = model
    return _cache[key]


def run_case(benchmark, smoke, variant, impl, mode, size, batch, device, dtype):
    if smoke:
        size, batch = (64, 64), 1
        if impl == "hf_compile" and (variant, mode) != ("b0", "fwd"):
            pytest.skip("smoke run: torch.compile is exercised once (b0 forward) to keep CI short")
    model = build(variant, impl, device, dtype)
    x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    model.train(mode == "fwd_bwd")

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = model(x).logits
        else:
            out = model(x).logits
            out.float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(versions(), variant=variant, impl=impl, mode=mode, size=list(size),
                                batch=batch, dtype=str(dtype), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)
    if device == "cuda":
        benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["b0", "b1", "b2"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_model_cpu(benchmark, smoke, variant, mode, impl):
    benchmark.group = f"model-cpu-{variant}-{mode}-512"
    run_case(benchmark, smoke, variant, impl, mode, (512, 512), 1, "cpu", torch.float32)


# the contender rows: (variant, side) where OpenVINO, ONNX Runtime and bf16 autocast are compared
CONTENDER_CASES = [("b0", 512), ("b2", 512), ("b0", 1024)]


def _contender_case(smoke, variant, side):
    """The input size of a contender row; the smoke run keeps one case (b0) at 64²."""
    if smoke and (variant, side) != ("b0", 512):
        pytest.skip("smoke run: one case per contender keeps CI short")
    return (64, 64) if smoke else (side, side)


@pytest.mark.parametrize("impl", ["hf_sdpa", "patched"])
def test_model_cpu_1024(benchmark, smoke, impl):
    """B0 at 1024² in fp32: the high-resolution row of the contenders table."""
    benchmark.group = "model-cpu-b0-fwd-1024"
    if smoke:
        pytest.skip("smoke run: the 512² rows cover these implementations")
    run_case(benchmark, smoke, "b0", impl, "fwd", (1024, 1024), 1, "cpu", torch.float32)


def ort_runner(variant, impl, size):
    """ONNX Runtime on the HF model exported with ``torch.onnx.export(dynamo=True)``, patched first
    for ``ort_patched`` (``segformer_fast.contenders.onnxruntime_runner``)."""
    pytest.importorskip("onnxruntime")
    from segformer_fast.contenders import onnxruntime_runner
    key = (variant, impl, size)
    if key not in _cache:
        model = copy.deepcopy(build(variant, "hf_sdpa", "cpu", torch.float32)).eval()
        if impl == "ort_patched":
            segformer_fast.patch(model)
        _cache[key] = onnxruntime_runner(model, torch.randn(1, 3, *size))
    return _cache[key]


@pytest.mark.parametrize("impl", ["ort_stock", "ort_patched"])
@pytest.mark.parametrize("variant,side", CONTENDER_CASES)
def test_model_cpu_onnxruntime(benchmark, smoke, variant, side, impl):
    benchmark.group = f"model-cpu-{variant}-fwd-{side}"
    size = _contender_case(smoke, variant, side)
    run, x = ort_runner(variant, impl, size), torch.randn(1, 3, *size)
    benchmark.extra_info.update(versions(), variant=variant, impl=impl, mode="fwd", size=list(size),
                                batch=1, dtype=str(torch.float32), device="cpu",
                                onnxruntime=__import__("onnxruntime").__version__)
    benchmark.pedantic(lambda: run(x), rounds=1 if smoke else 5,
                       warmup_rounds=0 if smoke else 1)


@pytest.mark.parametrize("precision", ["f32", "default"])
@pytest.mark.parametrize("variant,side", CONTENDER_CASES)
def test_model_cpu_openvino(benchmark, smoke, variant, side, precision):
    """OpenVINO's CPU plugin on the same HF weights (optional: ``pip install .[bench]``): fp32,
    and its default precision (bf16 on CPUs with AVX512-BF16/AMX)."""
    pytest.importorskip("openvino")
    from segformer_fast.contenders import openvino_runner

    benchmark.group = f"model-cpu-{variant}-fwd-{side}"
    size = _contender_case(smoke, variant, side)
    key = (variant, "openvino", precision, size)
    x = torch.randn(1, 3, *size)
    if key not in _cache:
        _cache[key] = openvino_runner(build(variant, "hf_sdpa", "cpu", torch.float32).eval(), x,
                                      None if precision == "default" else precision)
    run = _cache[key]
    benchmark.extra_info.update(versions(), variant=variant, impl=f"openvino_{precision}", mode="fwd",
                                size=list(size), batch=1, dtype=str(run.precision), device="cpu",
                                openvino=__import__("openvino").__version__)
    benchmark.pedantic(lambda: run(x), rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)


@pytest.mark.parametrize("variant,side", CONTENDER_CASES)
def test_model_cpu_bf16_autocast(benchmark, smoke, variant, side):
    """The patched model under CPU bf16 autocast (the row to read against openvino_default)."""
    benchmark.group = f"model-cpu-{variant}-fwd-{side}"
    size = _contender_case(smoke, variant, side)
    model = build(variant, "patched", "cpu", torch.float32).eval()
    x = torch.randn(1, 3, *size)

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).logits
    benchmark.extra_info.update(versions(), variant=variant, impl="patched_bf16_autocast", mode="fwd",
                                size=list(size), batch=1, dtype="torch.bfloat16 (autocast)", device="cpu")
    benchmark.pedantic(step, rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (1024, 2048)], ids=["512", "1024", "1024x2048"])
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_model_cuda(benchmark, smoke, variant, size, batch, dtype, mode, impl):
    if not CUDA:
        pytest.skip("no CUDA device")
    benchmark.group = f"model-cuda-{variant}-{mode}-{size[0]}x{size[1]}-b{batch}-{dtype}"
    run_case(benchmark, smoke, variant, impl, mode, size, batch, "cuda", dtype)
