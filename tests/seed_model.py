"""The seed document's SegFormer (../shared/seed/segformer-explainer.md): a real user model of the
NVlabs kind. It is loaded from the document at test time, not copied into this repository."""
from __future__ import annotations

import os
import re
import types
from pathlib import Path

SEED = Path(os.environ.get("SEGFORMER_FAST_SEED", Path(__file__).resolve().parents[2] / "shared" / "seed"
                           / "segformer-explainer.md"))


def load_seed_module() -> types.ModuleType | None:
    """Execute the document's full-model code block; None when the document is absent (in CI,
    which always has shared/ beside the checkout, absence is an error)."""
    if not SEED.is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"seed document not found at {SEED}")
        return None
    blocks = re.findall(r"~~~python\n(.*?)~~~", SEED.read_text(encoding="utf-8"), flags=re.S)
    code = next(b for b in blocks if "class SegFormer(nn.Module)" in b)
    code = code.split("if __name__ == '__main__':\n    model = SegFormer")[0]  # drops the thop profiling
    mod = types.ModuleType("seed_segformer")
    exec(compile(code, str(SEED), "exec"), mod.__dict__)
    return mod
