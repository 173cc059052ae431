"""Our reference SegFormer B0-B5 and converters from Hugging Face and NVlabs weights."""
from .convert import from_hf, from_nvlabs_state_dict
from .segformer import VARIANTS, SegFormer, segformer

__all__ = ["SegFormer", "segformer", "from_hf", "from_nvlabs_state_dict", "VARIANTS"]
