"""The integer codes both kernel backends share: element dtypes, activations and GEMM
epilogues. The Triton kernels take them as constexprs; the CUDA extension takes them as
ints in its argument structs, and csrc/common.cuh declares the same values (a test reads the
header and compares), so one table here is the only place they are defined.
"""

from __future__ import annotations

import torch

# element dtype of a kernel's operands (csrc: DTypeCode)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# activation applied in a GEMM prologue/epilogue (csrc: ActCode); "none" = identity
ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# GEMM epilogue, applied to v = alpha * acc + bias (csrc: EpiCode):
EPI_NONE = 0  # C = v; C2 = act(v) when a C2 is given (MLP forward: h and act(h); Triton x alpha2)
EPI_DACT = 1  # C = v * act'(Z) (Z = the pre-activation h); C2 = act(Z) when given (MLP bwd)
EPI_ADD = 2  # C = v + Z (merge_lora: W + s B A, also in place with C = Z = W)


def activation_code(name: str) -> int:
    """The code of a model activation (not "none": the ops always apply one)."""
    if name not in ACT_CODES or name == "none":
        names = tuple(n for n in ACT_CODES if n != "none")
        raise ValueError(f"activation: expected one of {names}, got {name!r}")
    return ACT_CODES[name]
