"""Ahead-of-time compilation of Triton kernels for GPUs this machine does not have.

``compile_report`` lowers a ``@triton.jit`` kernel to a cubin for a ``GPUTarget`` (sm_80, sm_90)
and runs the ptxas that Triton ships with ``-v`` to read registers and spills. This works without
a GPU and is how we check that a kernel's configuration is viable on real hardware.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class CompileReport:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    constexprs: dict

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def __str__(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return (f"{self.kernel}[{ce}] sm_{self.arch} warps={self.num_warps} stages={self.num_stages}: "
                f"{self.registers} regs, {self.spills} B spilled, {self.shared_bytes} B smem")


def compile_report(fn, signature: dict[str, str], constexprs: dict, arch: int, *,
                   divisible_by_16: tuple[str, ...] = (), num_warps: int = 4,
                   num_stages: int = 3) -> CompileReport:
    """Compile ``fn`` for ``sm_{arch}`` and report its resources.

    signature: every argument's Triton type ("*fp32", "i32", ..., "constexpr" for constexprs).
    divisible_by_16: the pointer/integer arguments the launcher sees 16-divisible at run time
    (Triton specialises on this; pass what real launches get so the compiled code is the same).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    name = compiled.metadata.name
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas output for {name}:\n{log}")
    return CompileReport(getattr(fn, "__name__", name), arch, num_warps, num_stages, int(regs.group(1)),
                         int(spill.group(1)), int(spill.group(2)), int(compiled.metadata.shared),
                         dict(constexprs))
