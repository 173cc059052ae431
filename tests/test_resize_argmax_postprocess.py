"""segformer_fast.postprocess / patch_processor against HF's SegformerImageProcessor
.post_process_semantic_segmentation and the image-segmentation pipeline (transformers 5.x)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segformer_fast
from test_resize_argmax import compare, logits_for

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from transformers.modeling_outputs import SemanticSegmenterOutput  # noqa: E402


def _stock_processor_class():
    """SegformerImageProcessor; where its image dependencies (torchvision, PIL) are missing, a class
    carrying HF's own post_process_semantic_segmentation, compiled from the installed transformers
    source (the method needs only torch)."""
    try:
        from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor
        return SegformerImageProcessor
    except ImportError:
        pass
    import ast
    import importlib.util
    import torch.nn.functional as F
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

    spec = importlib.util.find_spec("transformers.models.segformer.image_processing_segformer")
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegformerImageProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "post_process_semantic_segmentation")
    ns = dict(torch=torch, F=F, is_torch_available=lambda: True,
              SemanticSegmentationPostProcessorOutput=SemanticSegmentationPostProcessorOutput)
    exec(compile(ast.Module(body=[fn], type_ignores=[]), spec.origin, "exec"), ns)
    return type("SegformerImageProcessor", (), {"post_process_semantic_segmentation":
                                                ns["post_process_semantic_segmentation"]})


SegformerImageProcessor = _stock_processor_class()


def _outputs(shape, seed=0):
    return SemanticSegmenterOutput(logits=logits_for(shape, seed=seed))


def test_postprocess_matches_stock_processor():
    proc = SegformerImageProcessor()
    out = _outputs((3, 19, 16, 12))
    sizes = [(64, 48), (37, 53), (64, 48)]                    # two images share a size
    stock = proc.post_process_semantic_segmentation(out, target_sizes=sizes)
    ours = segformer_fast.postprocess(out, sizes)
    assert len(ours) == len(stock) == 3
    ties = 0
    for i, (a, b) in enumerate(zip(ours, stock)):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.int64
        ties += compare(a[None], out.logits[i:i + 1], sizes[i], False)
    print("near-ties", ties, "of", sum(h * w for h, w in sizes))
    # the other forms HF documents for target_sizes (a tensor, an array) give the same labels
    for target in (torch.tensor(sizes), np.array(sizes)):
        assert all(torch.equal(a, b) for a, b in zip(segformer_fast.postprocess(out, target), ours))
    # no target sizes: argmax at logit resolution, exactly as HF
    stock = proc.post_process_semantic_segmentation(out)
    assert all(torch.equal(a, b) for a, b in zip(segformer_fast.postprocess(out), stock))
    assert all(torch.equal(a, b) for a, b in zip(segformer_fast.postprocess(out.logits), stock))
    with pytest.raises(ValueError, match="as many target sizes"):
        segformer_fast.postprocess(out, sizes[:2])


def test_patch_processor_binds_on_the_instance_and_unpatches():
    proc, other = SegformerImageProcessor(), SegformerImageProcessor()
    out = _outputs((2, 5, 8, 8), seed=1)
    sizes = [(32, 32), (20, 28)]
    stock = proc.post_process_semantic_segmentation(out, target_sizes=sizes)
    assert segformer_fast.patch_processor(proc) is proc
    segformer_fast.patch_processor(proc)                       # idempotent
    fused = proc.post_process_semantic_segmentation(out, target_sizes=sizes)
    assert all(torch.equal(a, b) for a, b in zip(fused, segformer_fast.postprocess(out, sizes)))
    for i, (a, b) in enumerate(zip(fused, stock)):
        compare(a[None], out.logits[i:i + 1], sizes[i], False)
    # full-resolution per-class scores asked for: the stock method answers
    full = proc.post_process_semantic_segmentation(out, target_sizes=sizes, return_segmentation_scores=True)
    assert full[0].segmentation_scores.shape == (5, 32, 32)
    assert "post_process_semantic_segmentation" not in other.__dict__
    segformer_fast.unpatch_processor(proc)
    assert "post_process_semantic_segmentation" not in proc.__dict__
    with pytest.raises(TypeError, match="no post_process_semantic_segmentation"):
        segformer_fast.patch_processor(object())


def test_pipeline_labels_identical_to_stock():
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor

    torch.manual_seed(0)
    cfg = SegformerConfig(hidden_sizes=[16, 32, 32, 32], num_attention_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                          decoder_hidden_size=16, num_labels=4,
                          id2label={i: f"c{i}" for i in range(4)}, label2id={f"c{i}": i for i in range(4)})
    model = SegformerForSemanticSegmentation(cfg).eval()
    proc = SegformerImageProcessor(size={"height": 64, "width": 64})  # noqa: F811
    pipe = transformers.pipeline("image-segmentation", model=model, image_processor=proc)
    img = Image.fromarray((np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8))
    stock = pipe(img, subtask="semantic")
    segformer_fast.patch_processor(pipe)
    assert "post_process_semantic_segmentation" in pipe.image_processor.__dict__
    fused = pipe(img, subtask="semantic")
    segformer_fast.unpatch_processor(pipe)
    assert [a["label"] for a in stock] == [b["label"] for b in fused]
    for a, b in zip(stock, fused):
        assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
