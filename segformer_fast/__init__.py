"""segformer_fast: fused kernels and drop-in modules that make SegFormer fast.

    import segformer_fast
    report = segformer_fast.patch(model)        # HF, NVlabs/seed, mmseg or smp SegFormer
    segformer_fast.set_backend("torch")          # auto | triton | cuda | cpu | torch | reference
"""
from ._lazy import lazy_getattr
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .patch import patch, unpatch  # the function shadows the subpackage name on purpose
from .postprocess import patch_processor, postprocess, unpatch_processor  # the same for postprocess

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "set_backend", "get_backend", "use_backend", "BACKENDS",
           "ops", "nn", "reference", "models", "postprocess", "patch_processor", "unpatch_processor"]

__getattr__ = lazy_getattr(__name__, {
    "ops": ".ops", "nn": ".nn", "reference": ".reference", "models": ".models",
})
