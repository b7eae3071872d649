"""Static check of the Triton kernels for Hopper, no GPU needed.

Compiles kernel configurations with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``
and reads the cubin with the cuobjdump shipped in the triton wheel: registers, stack
(spills), and whether the SASS uses tensor-core instructions (HGMMA / HMMA).

    python benchmarks/triton_static.py [--out DIR] [--kernel attention]

Must run WITHOUT TRITON_INTERPRET (the interpreter replaces the compiled kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TL_DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_kernel(
    fn,
    ptr_types: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    float_args=(),
    int_values=None,
):
    """Compile like the JIT would specialise a launch: integer arguments equal to 1 become
    constants, pointers and integers divisible by 16 get the divisibility hint.
    int_values: example values of the integer arguments (default: 16-divisible)."""
    int_values = int_values or {}
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, n in enumerate(fn.arg_names):
        if n in ptr_types:
            sig[n] = ptr_types[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in constexprs:
            sig[n] = "constexpr"
        elif n in float_args:
            sig[n] = "fp32"
        else:
            v = int_values.get(n, 16)
            if v == 1:
                sig[n] = "constexpr"
                consts[n] = 1
            else:
                sig[n] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def resources(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-sass", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(path)
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    mma = sorted(set(re.findall(r"\b(HGMMA\.[\w.]+|HMMA\.[\w.]+)", sass)))
    return {
        "regs": reg,
        "stack": stack,
        "local": local,
        "shared": kernel.metadata.shared,
        "tensor_core": mma,
    }


def _attn_ints(n: int, d: int) -> dict:
    """Integer arguments of a contiguous (B=4, H=16, N, D) launch with a (B, N) padding mask."""
    v = {"H": 16, "NQ": n, "NK": n, "HEAD_DIM": d, "NQ_KEY": n, "NK_KEY": n}
    for p in ("sq", "sk", "sv", "so", "sdo"):
        v.update(
            {
                p + "b": 16 * n * d,
                p + "h": n * d,
                p + "m": d,
                p + "n": d,
                p + "d": 1,
                p + "om": d,
                p + "od": 1,
            }
        )
    v.update(
        {
            "slb": 16 * n,
            "slh": n,
            "slm": 1,
            "smb": 0,
            "smh": 0,
            "smm": n,
            "smn": 1,
            "skpb": n,
            "skpn": 1,
        }
    )
    return v


def attention_cases():
    """(name, fn, ptr_types, constexprs, warps, stages, float_args) for the configs the
    autotuner may pick on Hopper for representative shapes."""
    os.environ.pop("TRITON_INTERPRET", None)
    from recon_kernels.triton import attention as A

    cases = []
    for dt in ("bf16", "fp16"):
        p = TL_DTYPE[dt]
        for d, nq in ((64, 512), (128, 8192), (256, 1024)):
            for causal, kpm, mask, drop in (
                (False, False, False, False),
                (True, False, False, False),
                (False, True, False, False),
                (False, False, True, False),
                (True, False, False, True),  # attention dropout (training GPT / BERT)
                (False, True, False, True),
            ):
                flags = dict(
                    BLOCK_D=d,
                    HAS_MASK=mask,
                    HAS_KPM=kpm,
                    CAUSAL=causal,
                    DROPOUT=drop,
                    PRECISION="ieee",
                    UPCAST=False,
                )
                for kname, kern, extra_ptrs in (
                    ("fwd", A._attn_fwd_kernel, {"O": p, "LSE": "*fp32"}),
                    (
                        "dkdv",
                        A._attn_bwd_dkdv_kernel,
                        {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p},
                    ),
                    (
                        "dq",
                        A._attn_bwd_dq_kernel,
                        {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p},
                    ),
                ):
                    ptrs = {
                        "Q": p,
                        "K": p,
                        "V": p,
                        "MASK": "*u8",
                        "KPM": "*u8",
                        "KVHI": "*i32",
                        **extra_ptrs,
                    }
                    named = {
                        "NQ": nq,
                        "NK": nq,
                        "BLOCK_D": d,
                        "HAS_MASK": mask,
                        "HAS_KPM": kpm,
                        "DROPOUT": drop,
                    }
                    configs = A._pruner(kname)(kern.configs, named)
                    for c in configs:
                        const = {**flags, **c.kwargs}
                        tag = (
                            f"{kname} {dt} D={d} N={nq} causal={int(causal)} kpm={int(kpm)} mask={int(mask)} "
                            f"drop={int(drop)} "
                            f"BM={c.kwargs['BLOCK_M']} BN={c.kwargs['BLOCK_N']} w={c.num_warps} s={c.num_stages}"
                        )
                        cases.append(
                            (
                                tag,
                                kern.fn,
                                ptrs,
                                const,
                                c.num_warps,
                                c.num_stages,
                                ("qk_scale", "sm_scale", "drop_scale"),
                                _attn_ints(nq, d),
                            )
                        )
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for triton_static.json / .md")
    ap.add_argument("--filter", default="", help="only cases whose tag contains this substring")
    ap.add_argument("--limit", type=int, default=0, help="compile at most this many cases")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the static check compiles the real kernels", file=sys.stderr)
        return 2
    rows = []
    cases = [c for c in attention_cases() if args.filter in c[0]]
    if args.limit:
        cases = cases[: args.limit]
    for tag, fn, ptrs, const, warps, stages, floats, ints in cases:
        k = compile_kernel(fn, ptrs, const, warps, stages, floats, ints)
        r = {"case": tag, **resources(k)}
        rows.append(r)
        print(
            f"{tag:90s} regs={r['regs']:3d} stack={r['stack']:4d} smem={r['shared']:6d} mma={','.join(r['tensor_core']) or 'NONE'}"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "triton_static.json"), "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["stack"] > 0 or not r["tensor_core"]]
    print(
        f"{len(rows)} kernels compiled for sm_90; {len(bad)} with spills or without tensor-core instructions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
