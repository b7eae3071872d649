"""Static SASS report of the Triton kernels for Hopper (sm_90a), no GPU needed.

Compiles every configuration the autotuner may pick on sm_90 (attention forward, dK/dV,
dQ and the fused atomic-dQ backward over dtype x head dim x causal / key-padding / general mask / dropout, and every GEMM
prologue/epilogue variant of the MLP and LoRA ops over its tiles) with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and reads the cubin with the
cuobjdump shipped in the triton wheel. Per kernel it records:

* regs, spill bytes (stack + local), spill instructions (STL / LDL) anywhere and inside
  loops, shared memory;
* the steady main loop (the innermost backward branch with the most tensor-core
  instructions; ties go to the shortest, i.e. the unmasked full-block loop): HGMMA per
  iteration next to the tile's ideal (each warpgroup owns 64-row slices, full N <= 256),
  the HGMMA work ratio (SASS m*n*k x warpgroups / the tile's m*n*k: 1.0 = nothing is
  computed twice), MUFU.EX2 per score element, SASS instructions per score element;
* global fp32 atomic adds in that loop (instructions, elements: F32x4 adds 4);
* the deepest wgmma wait in that loop (``WARPGROUP.DEPBAR.LE gsb0, N``: 0 = every HGMMA
  group is waited for before the next is issued, the tensor cores serialise);
* TMA (UTMALDG / UBLKCP / UTMASTG) and warp specialisation (USETMAXREG).

    python benchmarks/sass_report.py --out benchmarks/results/static-sm90      # installed triton
    python benchmarks/sass_report.py --triton-venv /work/venv36 --create-venv \\
        --out benchmarks/results/static-sm90                                    # + triton 3.6

Each run writes ``sass-triton<version>.json``; the markdown table ``README.md`` in --out
is rebuilt from every JSON there, with the published H100 anchors beside it. Must run
WITHOUT TRITON_INTERPRET (the interpreter replaces the compiled kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TL_DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# (causal, kpm, mask, dropout): the variants the models launch
ATTN_FLAGS = (
    (False, False, False, False),
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (True, False, False, True),  # GPT training with attention dropout
    (False, True, False, True),  # BERT training with attention dropout
)
# (head dim, sequence length) of the representative shapes
ATTN_SHAPES = ((64, 512), (128, 8192), (256, 1024))

# name -> (constexpr flags, (A, B) unit stride along K): every GEMM the MLP and LoRA ops
# launch (tests/test_mlp.py and tests/test_lora.py name the same variants)
GEMM_VARIANTS = {
    "mlp_fwd_gemm1_bias_gelu_h": (dict(ACT=1, HAS_BIAS=True, STORE_C2=True), (True, True)),
    "mlp_fwd_gemm1_gelu_tanh": (dict(ACT=2, HAS_BIAS=True, STORE_C2=True), (True, True)),
    "mlp_fwd_gemm2_bias": (dict(HAS_BIAS=True), (True, True)),
    "mlp_bwd_dh_dact_db1": (dict(ACT=1, EPI=1, HAS_CSUM=True), (True, False)),
    "mlp_bwd_dh_dact_db1_store": (
        dict(ACT=1, EPI=1, HAS_CSUM=True, STORE_C2=True),
        (True, False),
    ),
    "mlp_bwd_dw2_act_prologue": (dict(ACT=1, PRO_ACT=True), (False, False)),
    "mlp_bwd_dw1": (dict(), (False, False)),
    "mlp_bwd_dx": (dict(), (True, False)),
    "lora_fwd_xa_scaled_copy": (dict(STORE_C2=True), (True, True)),
    "lora_fwd_main_bias": (dict(HAS_AB2=True, HAS_BIAS=True), (True, True)),
    "lora_bwd_dx": (dict(HAS_AB2=True), (True, False)),
    "lora_merge_add_w": (dict(EPI=2), (True, False)),
}

# Published H100 SXM TFLOP/s (FlashAttention-3 paper, Shah et al. 2024, figs. 5 and 10):
# head dim 128, non-causal, sequence 8k, fp16/bf16. Anchors, not our measurements.
ANCHORS = {
    "fwd": {
        "FlashAttention-2": 370,
        "Triton tutorial 06": 392,
        "cuDNN": 600,
        "FlashAttention-3": 646,
    },
    "bwd": {"FlashAttention-2": 318, "cuDNN": 518, "FlashAttention-3": 559},
}


# --------------------------------------------------------------------------- compiling


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_kernel(
    fn,
    ptr_types: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    float_args=(),
    int_values=None,
    arch: int = 90,
):
    """Compile ``fn`` for sm_<arch> (90: sm_90a) as the JIT would specialise a launch: integer arguments
    equal to 1 become constants, pointers and integers divisible by 16 get the divisibility
    hint. int_values: example values of the integer arguments (default: 16-divisible)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    int_values = int_values or {}
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, n in enumerate(fn.arg_names):
        if n in ptr_types:
            sig[n] = ptr_types[n]
            if ptr_types[n].startswith("*"):  # (tensordesc<...>: no pointer hint)
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
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run(
            [_bin("cuobjdump"), flag, path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------- SASS analysis

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`?\(?\.?L?_?x?_?\d*\)?)?\s*0x([0-9a-f]+)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.(16)(8)(16|8)\b")  # HMMA.16816 = m16 n8 k16, HMMA.1688
_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)")
# global fp32 atomic adds (the atomic-dQ backward): REDG.E.ADD.F32x4... adds 4 elements
_RED = re.compile(r"\b(?:REDG?|ATOMG?)\.E\.ADD\.F32(?:x(\d))?")


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """(byte address, instruction text without predicate-free trailing encoding) per line."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def find_loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Innermost loops as (first, last) instruction indices: backward branches whose body
    holds no other backward branch."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    loops = []
    for i, (addr, text) in enumerate(instrs):
        m = _BRA.match(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            loops.append((index[target], i))
    return [
        (lo, hi)
        for lo, hi in loops
        if not any((lo <= a and b <= hi) and (a, b) != (lo, hi) for a, b in loops)
    ]


def _mma_work(body: list[str]) -> tuple[int, int, int]:
    """(HGMMA count, HMMA count, m*n*k summed over them) in ``body``."""
    hg = hm = work = 0
    for t in body:
        m = _HGMMA.search(t)
        if m:
            hg += 1
            work += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
            continue
        m = _HMMA.search(t)
        if m:
            hm += 1
            work += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return hg, hm, work


def sass_metrics(sass: str) -> dict:
    """Loop-level metrics of one kernel's SASS (see the module docstring)."""
    instrs = parse_sass(sass)
    texts = [t for _, t in instrs]
    loops = []
    for lo, hi in find_loops(instrs):
        body = texts[lo : hi + 1]
        hg, hm, work = _mma_work(body)
        waits = [int(m.group(1), 16) for t in body for m in [_WAIT.search(t)] if m]
        loops.append(
            dict(
                instrs=len(body),
                hgmma=hg,
                hmma=hm,
                mma_work=work,
                ex2=sum("MUFU.EX2" in t for t in body),
                red=sum(bool(_RED.search(t)) for t in body),
                red_elems=sum(int(m.group(1) or 1) for t in body for m in [_RED.search(t)] if m),
                wait_depth=max(waits) if waits else None,
            )
        )
    main = None
    if loops:
        main = max(
            loops, key=lambda lp: (lp["hgmma"] + lp["hmma"] > 0, lp["mma_work"], -lp["instrs"])
        )
    all_waits = [int(m.group(1), 16) for t in texts for m in [_WAIT.search(t)] if m]
    spill = re.compile(r"\b(STL|LDL)\b")
    return dict(
        total_instrs=len(texts),
        loops=len(loops),
        # local-memory (spill) stores and loads inside any innermost loop, and anywhere
        loop_spills=sum(
            bool(spill.search(texts[i])) for lo, hi in find_loops(instrs) for i in range(lo, hi + 1)
        ),
        spill_instrs=sum(bool(spill.search(t)) for t in texts),
        main=main,
        kernel_wait_depth=max(all_waits) if all_waits else None,
        tma=sum(bool(re.search(r"\bU(TMALDG|BLKCP|TMASTG|TMAPF)\b", t)) for t in texts),
        setmaxreg=any("USETMAXREG" in t for t in texts),
        tensor_core=sorted(
            {m.group(0) for t in texts for m in [re.search(r"\b(HGMMA|HMMA)\.[\w.]+", t)] if m}
        ),
    )


def ideal_hgmma(dots, num_warps: int) -> int:
    """HGMMA a warpgroup issues per iteration when the warpgroups split the rows: each dot
    (M, N, K) is ceil(M / (64 x warpgroups)) x ceil(N / 256) x K / 16 instructions."""
    wg = max(1, num_warps // 4)
    return sum(math.ceil(m / (64 * wg)) * math.ceil(n / 256) * (k // 16) for m, n, k in dots)


def attention_dots(
    kernel: str, bm: int, bn: int, bd: int, d_split: int = 1
) -> list[tuple[int, int, int]]:
    """The (M, N, K) tensor-core products of one main-loop iteration (``d_split`` > 1: the
    backward program owning BLOCK_D / d_split gradient columns, scores over all of D)."""
    g = bd // d_split
    if kernel == "fwd":
        return [(bm, bn, bd), (bm, bd, bn)]
    if kernel == "dq":
        return [(bm, bn, bd), (bm, bn, bd), (bm, g, bn)]
    if kernel == "dkdv":
        return [(bn, bm, bd), (bn, g, bm), (bn, bm, bd), (bn, g, bm)]
    if kernel == "atomic":  # dK/dV's four plus dQᵀ = Kᵀ dSᵀ (D, M), K = BLOCK_N
        return [(bn, bm, bd), (bn, g, bm), (bn, bm, bd), (bn, g, bm), (g, bm, bn)]
    raise ValueError(f"kernel: expected fwd, dq, dkdv or atomic, got {kernel!r}")


def analyse(compiled, num_warps: int, dots, elems: int | None) -> dict:
    """Resources + SASS metrics; per-element numbers use ``elems`` score elements per
    iteration (None for GEMMs)."""
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    sass = _cuobjdump(cubin, "--dump-sass")
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    m = sass_metrics(sass)
    main = m.pop("main") or {}
    # warp specialisation (USETMAXREG) launches more warps than the config asks for: a
    # producer warpgroup (TMA, no MMA) and consumer warpgroups, each running its own copy of
    # the main loop over its 64-row slice; the per-thread metrics count the consumers
    launched = getattr(compiled.metadata, "num_warps", num_warps)
    if m["setmaxreg"] and launched > num_warps:
        num_warps = launched - 4
    threads = 32 * num_warps
    wg = max(1, num_warps // 4)
    tile_work = sum(a * b * c for a, b, c in dots)
    row = dict(
        regs=reg,
        spill_bytes=stack + local,
        smem=compiled.metadata.shared,
        **m,
        loop_instrs=main.get("instrs"),
        hgmma_per_iter=main.get("hgmma"),
        hmma_per_iter=main.get("hmma"),
        # the ideal applies to wgmma tiles (>= 64 rows); mma.sync tiles report None
        hgmma_ideal=ideal_hgmma(dots, num_warps) if main.get("hgmma") else None,
        mma_warps=num_warps,
        # HMMA tiles are per warp, HGMMA per warpgroup: scale the SASS work to the CTA
        mma_work_ratio=(
            round(main["mma_work"] * (wg if main["hgmma"] else num_warps) / tile_work, 3)
            if main.get("mma_work")
            else None
        ),
        wait_depth=main.get("wait_depth"),
        # fp32 atomic-add instructions per thread per iteration, and the elements they add
        red_per_iter=main.get("red"),
        red_elems_per_iter=main.get("red_elems"),
    )
    if elems:
        row["ex2_per_elem"] = round(main.get("ex2", 0) * threads / elems, 3) if main else None
        row["instr_per_elem"] = round(main["instrs"] * threads / elems, 2) if main else None
    return row


# --------------------------------------------------------------------------- cases


def _attn_ints(n: int, d: int) -> dict:
    """Integer arguments of a contiguous (B=4, H=16, N, D) launch with a (B, N) padding mask."""
    v = {"H": 16, "NQ": n, "NK": n, "HEAD_DIM": d, "NQ_KEY": n, "NK_KEY": n}
    for p in ("sq", "sk", "sv", "so", "sdo"):
        for s, val in (
            ("b", 16 * n * d),
            ("h", n * d),
            ("m", d),
            ("n", d),
            ("d", 1),
            ("om", d),
            ("od", 1),
        ):
            v[p + s] = val
    v.update(slb=16 * n, slh=n, slm=1, smb=0, smh=0, smm=n, smn=1, skpb=n, skpn=1)
    return v


def attention_cases(dtypes=("bf16", "fp16"), all_configs_for=("bf16",)) -> list[dict]:
    """Every pruned config of the three attention kernels (``all_configs_for`` dtypes; the
    first choice, what RECON_TRITON_AUTOTUNE=0 runs, for the others)."""
    import torch

    from recon_kernels.triton import attention as A

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cases = []
    for dt in dtypes:
        for d, n in ATTN_SHAPES:
            for causal, kpm, mask, drop in ATTN_FLAGS:
                for kname, kern in (
                    ("fwd", A._attn_fwd_kernel),
                    ("dkdv", A._attn_bwd_dkdv_kernel),
                    ("dq", A._attn_bwd_dq_kernel),
                    ("atomic", A._attn_bwd_atomic_kernel),
                ):
                    named = dict(
                        # the pruner sizes shared memory by the operand dtype
                        Q=torch.empty(0, dtype=torch_dtype[dt]),
                        NQ=n,
                        NK=n,
                        BLOCK_D=d,
                        HAS_MASK=mask,
                        HAS_KPM=kpm,
                        DROPOUT=drop,
                        CAUSAL=causal,
                        # FAST, TMA: the forward loop's tiles
                        **A.static_constexprs(kname, d, mask, kpm, drop, causal),
                    )
                    configs = A._pruner(kname)(kern.configs, named)
                    if dt not in all_configs_for:
                        configs = configs[:1]
                    # D_SPLIT programs per backward tile (bwd_d_split), in the tag if > 1
                    d_split = named.get("D_SPLIT", 1)
                    for rank, c in enumerate(configs):
                        cases.append(
                            dict(
                                **({"d_split": d_split} if d_split > 1 else {}),
                                family="attention",
                                kernel=kname,
                                dtype=dt,
                                D=d,
                                N=n,
                                causal=causal,
                                kpm=kpm,
                                mask=mask,
                                dropout=drop,
                                rank=rank,
                                BM=c.kwargs["BLOCK_M"],
                                BN=c.kwargs["BLOCK_N"],
                                warps=c.num_warps,
                                stages=c.num_stages,
                                extra={
                                    k: v
                                    for k, v in c.kwargs.items()
                                    if k not in ("BLOCK_M", "BLOCK_N")
                                },
                            )
                        )
    return cases


def gemm_cases(dtypes=("bf16", "fp16"), all_configs_for=("bf16",)) -> list[dict]:
    """Every GEMM variant over the sm_90 tiles (fit to a large problem, as the autotuner sees
    them for M = N = K = 4096)."""
    from recon_kernels.triton import _gemm as G

    cases = []
    for dt in dtypes:
        for name, (flags, ck) in GEMM_VARIANTS.items():
            configs = G.fit_configs(
                G._configs(),
                4096,
                4096,
                4096,
                2,
                arch=90,
                pro_act=flags.get("PRO_ACT", False),
                ab2=flags.get("HAS_AB2", False),
            )
            if dt not in all_configs_for:
                configs = configs[:1]
            for rank, c in enumerate(configs):
                cases.append(
                    dict(
                        family="gemm",
                        kernel=name,
                        dtype=dt,
                        flags=flags,
                        contiguous_k=list(ck),
                        rank=rank,
                        BM=c.kwargs["BLOCK_M"],
                        BN=c.kwargs["BLOCK_N"],
                        BK=c.kwargs["BLOCK_K"],
                        warps=c.num_warps,
                        stages=c.num_stages,
                        extra={
                            k: v
                            for k, v in c.kwargs.items()
                            if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                        },
                    )
                )
    return cases


def case_tag(c: dict) -> str:
    if c["family"] == "attention":
        return (
            f"{c['kernel']} {c['dtype']} D={c['D']} N={c['N']} causal={int(c['causal'])} "
            f"kpm={int(c['kpm'])} mask={int(c['mask'])} drop={int(c['dropout'])} "
            f"BM={c['BM']} BN={c['BN']} w={c['warps']} s={c['stages']}"
            + (f" dsplit={c['d_split']}" if c.get("d_split", 1) > 1 else "")
        )
    return (
        f"gemm {c['kernel']} {c['dtype']} kcontig={''.join(str(int(x)) for x in c['contiguous_k'])} "
        f"BM={c['BM']} BN={c['BN']} BK={c['BK']} w={c['warps']} s={c['stages']}"
    )


def compile_case(c: dict):
    """(compiled kernel, MMA dots of one iteration, score elements per iteration or None)."""
    p = TL_DTYPE[c["dtype"]]
    if c["family"] == "attention":
        from recon_kernels.triton import attention as A

        kern = {
            "fwd": A._attn_fwd_kernel,
            "dkdv": A._attn_bwd_dkdv_kernel,
            "dq": A._attn_bwd_dq_kernel,
            "atomic": A._attn_bwd_atomic_kernel,
        }[c["kernel"]]
        extra_ptrs = {
            "fwd": {"O": p, "LSE": "*fp32"},
            "dkdv": {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p},
            "dq": {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p},
            "atomic": {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p},
        }[c["kernel"]]
        ptrs = {"Q": p, "K": p, "V": p, "MASK": "*u8", "KPM": "*u8", "KVHI": "*i32", **extra_ptrs}
        fn = kern.fn
        ptrs = {k: v for k, v in ptrs.items() if k in fn.arg_names}
        for extra in ("DQ_ACC",):  # fp32 workspaces of optional variants
            if extra in fn.arg_names:
                ptrs[extra] = "*fp32"
        const = dict(
            BLOCK_D=c["D"],
            HAS_MASK=c["mask"],
            HAS_KPM=c["kpm"],
            CAUSAL=c["causal"],
            DROPOUT=c["dropout"],
            PRECISION="ieee",
            UPCAST=False,
            BLOCK_M=c["BM"],
            BLOCK_N=c["BN"],
            **c.get("extra", {}),
        )
        if c.get("d_split", 1) > 1:
            const["D_SPLIT"] = c["d_split"]
        const = {k: v for k, v in const.items() if k in fn.arg_names}
        flags = (c["D"], c["mask"], c["kpm"], c["dropout"])
        for k, v in A.static_constexprs(c["kernel"], *flags, c["causal"]).items():
            if k in fn.arg_names:
                const.setdefault(k, v)
        if const.get("TMA") and not const.get("DEV_DESC"):  # host descriptors of 4-D K, V
            for n in ("K", "V"):
                ptrs[n] = f"tensordesc<{p[1:]}[1, 1, {c['BN']}, {c['D']}]>"
        floats = tuple(n for n in ("qk_scale", "sm_scale", "drop_scale") if n in fn.arg_names)
        k = compile_kernel(
            fn, ptrs, const, c["warps"], c["stages"], floats, _attn_ints(c["N"], c["D"])
        )
        # per score element of the problem: D_SPLIT programs share each (BM, BN) tile
        ds = const.get("D_SPLIT", 1)
        dots = attention_dots(c["kernel"], c["BM"], c["BN"], c["D"], ds)
        return k, dots, c["BM"] * c["BN"] // ds
    k = _compile_gemm(
        c["dtype"],
        (c["BM"], c["BN"], c["BK"], c["warps"], c["stages"]),
        c["contiguous_k"],
        c["flags"],
        c.get("extra", {}),
    )
    return k, [(c["BM"], c["BN"], c["BK"])], None


def _compile_gemm(dtype: str, block, contiguous_k, flags: dict, extra=None, arch: int = 90):
    """The GEMM kernel as the JIT builds it for operands whose sizes/strides are multiples
    of 16, with unit stride along K where ``contiguous_k`` says (A, B)."""
    from recon_kernels.triton import _gemm as G

    p = TL_DTYPE[dtype]
    bm, bn, bk, warps, stages = block
    fn = G._gemm_kernel
    defaults = dict(
        ACT=0, PRO_ACT=False, HAS_AB2=False, HAS_BIAS=False, EPI=0, STORE_C2=False, HAS_CSUM=False
    )
    defaults.update(flags)
    const = dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_R=16,
        EPI_CHUNK=64,
        PRECISION="ieee",
        UPCAST=False,
        SPLIT_K=1,
        **{"GROUP_M": 8, **(extra or {})},
        **defaults,
    )
    ka, kb = contiguous_k
    # unit strides are specialised to constants by the JIT: mirror the operand layouts
    ints = {
        "sak" if ka else "sam": 1,
        "sbk" if kb else "sbn": 1,
        "scn": 1,
        "sa2r": 1,
        "sb2n": 1,
        "szn": 1,
        "sc2n": 1,
    }
    for k, v in G.static_constexprs(contiguous_k).items():
        const.setdefault(k, v)
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    ptrs = {n: p for n in ("A", "B", "C", "A2", "B2", "BIAS", "Z", "C2")}
    ptrs["CSUM"] = "*fp32"
    # RECON_GEMM_TMA: host-side descriptors over the operand or its transpose (TMA_* = 2)
    for n, blk in (("A", [bm, bk]), ("B", [bk, bn])):
        code = const.get("TMA_" + n, 0)
        if code:
            b0, b1 = blk if code == 1 else blk[::-1]
            ptrs[n] = f"tensordesc<{p[1:]}[{b0}, {b1}]>"
    ptrs = {k: v for k, v in ptrs.items() if k in fn.arg_names}
    return compile_kernel(fn, ptrs, const, warps, stages, ("alpha", "alpha2"), ints, arch=arch)


def gemm_compile_static(
    dtype=None, *, arch: int = 90, block=None, contiguous_k=(True, False), **flags
) -> dict:
    """The GEMM compiled for sm_<arch> without a GPU (what tests/test_mlp.py and
    tests/test_lora.py check): {"mma": tensor-core instructions in the PTX, "regs",
    "spill_bytes", "shared", "ptx"} plus the SASS metrics on sm_90.
    dtype: torch dtype or "bf16"/"fp16"; block: (BM, BN, BK, warps, stages)."""
    from recon_kernels.triton import _gemm as G

    if G.INTERPRET:
        raise RuntimeError(
            "compile_static needs TRITON_INTERPRET unset (the JIT, not the interpreter)"
        )
    if dtype is None or not isinstance(dtype, str):
        import torch

        dtype = {
            torch.float16: "fp16",
            torch.bfloat16: "bf16",
            torch.float32: "fp32",
            None: "bf16",
        }[dtype]
    block = tuple(block or G._GPU_CONFIGS[0])
    ck = _compile_gemm(dtype, block, tuple(contiguous_k), flags, arch=arch)
    ptx = ck.asm["ptx"]
    usage = _cuobjdump(ck.asm["cubin"], "--dump-resource-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    report = {
        "mma": sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx))),
        "shared": ck.metadata.shared,
        "ptx": ptx,
        "regs": int(m.group(1)) if m else None,
        "spill_bytes": int(m.group(2)) + int(m.group(4)) if m else None,
    }
    if arch == 90:
        report.update(analyse(ck, block[3], [block[:3]], None))
    return report


def run_case(c: dict) -> dict:
    t0 = time.time()
    try:
        k, dots, elems = compile_case(c)
        row = analyse(k, c["warps"], dots, elems)
    except Exception as e:  # a config that does not compile is a finding, not a crash
        row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    row["compile_s"] = round(time.time() - t0, 2)
    return {"case": case_tag(c), **c, **row}


def run_cases(cases: list[dict], jobs: int = 1, log=None) -> list[dict]:
    if jobs <= 1:
        rows = []
        for c in cases:
            rows.append(run_case(c))
            if log:
                log(rows[-1])
        return rows
    import multiprocessing as mp

    # fresh workers every few dozen compiles: one long-lived process that compiled a few
    # hundred kernels has crashed (SIGSEGV) in triton's compiler
    with mp.get_context("fork").Pool(jobs, maxtasksperchild=40) as pool:
        rows = []
        for r in pool.imap(run_case, cases):
            rows.append(r)
            if log:
                log(r)
        return rows


def select(cases: list[dict], filters: list[str]) -> list[dict]:
    """Cases whose tag has every word of at least one filter (no filter keeps all)."""
    if not filters:
        return cases
    keep = []
    for c in cases:
        words = set(case_tag(c).split())
        if any(set(f.split()) <= words for f in filters):
            keep.append(c)
    return keep


# --------------------------------------------------------------------------- output


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def markdown(results: dict[str, list[dict]]) -> str:
    """One table per triton version, first choices (rank 0) in bold, anchors at the end."""
    out = [
        "# Static SASS metrics, sm_90a (no GPU)",
        "",
        "Generated by `benchmarks/sass_report.py` (compiled with `triton.compile(target=",
        'GPUTarget("cuda", 90, 32))`, read with cuobjdump). Per kernel and config the autotuner',
        "may pick: registers, spill bytes, shared memory; in the steady main loop: HGMMA per",
        "iteration vs the tile's ideal, work ratio (1.0 = no replicated tensor-core work),",
        "MUFU.EX2 and SASS instructions per score element (per thread x threads / tile),",
        "deepest wgmma wait (`WARPGROUP.DEPBAR.LE gsb0, N`; 0 = serialised); TMA instructions",
        "and `USETMAXREG` (warp specialisation) anywhere in the kernel. `rank` 0 is the first",
        "choice (what `RECON_TRITON_AUTOTUNE=0` runs). Static facts only: no timing.",
        "",
    ]
    cols = [
        ("case", "case"),
        ("rank", "rank"),
        ("regs", "regs"),
        ("spill", "spill_bytes"),
        ("smem", "smem"),
        ("HGMMA/it", "hgmma_per_iter"),
        ("ideal", "hgmma_ideal"),
        ("work", "mma_work_ratio"),
        ("EX2/elem", "ex2_per_elem"),
        ("instr/elem", "instr_per_elem"),
        ("loop instr", "loop_instrs"),
        ("wait", "wait_depth"),
        ("TMA", "tma"),
        ("setmaxreg", "setmaxreg"),
    ]
    for ver, rows in sorted(results.items()):
        meta = rows[0].get("_meta", {}) if rows else {}
        body = [r for r in rows if "case" in r]
        out += [f"## triton {ver}", ""]
        if meta:
            out += [f"switches: `{json.dumps(meta.get('env', {}))}`; {len(body)} kernels", ""]
        out.append("| " + " | ".join(c for c, _ in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in body:
            if "error" in r:
                out.append(f"| {r['case']} | {r['rank']} | compile error: {r['error'][:80]} |")
                continue
            cells = [_fmt(r.get(k)) for _, k in cols]
            if r.get("rank") == 0:
                cells[0] = f"**{cells[0]}**"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## Published anchors (H100 SXM, head dim 128, non-causal, seq 8k; TFLOP/s)",
        "",
        "From the FlashAttention-3 paper (Shah et al., 2024). Not measured here; the GPU run",
        "(`benchmarks/bench_attention.py`) is what may be compared with them.",
        "",
        "| pass | " + " | ".join(ANCHORS["fwd"]) + " |",
        "|---|" + "---|" * len(ANCHORS["fwd"]),
        "| forward | " + " | ".join(str(v) for v in ANCHORS["fwd"].values()) + " |",
        "| backward | "
        + " | ".join(str(ANCHORS["bwd"].get(k, "-")) for k in ANCHORS["fwd"])
        + " |",
        "",
        "SASS instructions per score element per thread in the steady forward loop, D = 128",
        "(from the static study behind issue #11): Triton tutorial 06 7.7-9.7,",
        "FlashAttention-3 6.75.",
        "",
    ]
    return "\n".join(out)


def write_markdown(out_dir: str) -> str:
    results = {}
    for f in sorted(os.listdir(out_dir)):
        m = re.fullmatch(r"sass-triton(.+)\.json", f)
        if m:
            with open(os.path.join(out_dir, f)) as fh:
                results[m.group(1)] = json.load(fh)
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as fh:
        fh.write(markdown(results))
    return path


# --------------------------------------------------------------------------- other triton


DEFAULT_VENV = os.environ.get(
    "RECON_TRITON_VENV",
    os.path.join(os.path.expanduser("~"), ".cache", "recon-kernels", "venv-triton3.6"),
)


def ensure_venv(path: str, create: bool, packages: str) -> str:
    """The python of the venv at ``path``; with ``create``, make it and install ``packages``
    (default: the installed torch version and triton 3.6.0, the GPU image's triton)."""
    py = os.path.join(path, "bin", "python")
    if os.path.exists(py):
        return py
    if not create:
        raise SystemExit(f"--triton-venv: no python at {py!r}; pass --create-venv to make it")
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *packages.split()], check=True)
    return py


def _strip_venv_args(args: list[str]) -> list[str]:
    """The command line for the child run: without --triton-venv [DIR], --create-venv and
    --venv-packages SPEC."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--create-venv" or a.startswith(("--triton-venv=", "--venv-packages=")):
            i += 1
        elif a == "--venv-packages":
            i += 2
        elif a == "--triton-venv":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
        else:
            out.append(a)
            i += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for sass-triton<ver>.json and README.md")
    ap.add_argument(
        "--filter",
        action="append",
        default=[],
        help="only cases whose tag has all these words, e.g. 'fwd bf16 D=128' (repeatable: any)",
    )
    ap.add_argument("--family", choices=("all", "attention", "gemm"), default="all")
    ap.add_argument("--first-only", action="store_true", help="only each kernel's first choice")
    ap.add_argument(
        "--gemm-all", action="store_true", help="every GEMM tile even with --first-only"
    )
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument(
        "--all-configs-for", default="bf16", help="dtypes whose every pruned config is compiled"
    )
    ap.add_argument("--limit", type=int, default=0, help="compile at most this many cases")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--json", default=None, help="write the rows to this file (default: in --out)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--triton-venv",
        nargs="?",
        const=DEFAULT_VENV,
        default=None,
        help=f"also run under this venv's triton (e.g. 3.6; default {DEFAULT_VENV}, or $RECON_TRITON_VENV)",
    )
    ap.add_argument("--create-venv", action="store_true", help="create --triton-venv if missing")
    ap.add_argument("--venv-packages", default=None, help="pip specs for --create-venv")
    ap.add_argument(
        "--md-only", action="store_true", help="only rebuild README.md from the JSON in --out"
    )
    args = ap.parse_args(argv)
    if args.md_only:
        print(write_markdown(args.out))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the report compiles the real kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    rc = 0
    if args.triton_venv:
        import torch

        pk = args.venv_packages or f"torch=={torch.__version__.split('+')[0]} triton==3.6.0 numpy"
        py = ensure_venv(args.triton_venv, args.create_venv, pk)
        clean = _strip_venv_args(list(argv if argv is not None else sys.argv[1:]))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        rc = subprocess.run([py, os.path.abspath(__file__), *clean], env=env).returncode

    dtypes = tuple(args.dtypes.split(","))
    allc = tuple(x for x in args.all_configs_for.split(",") if x)
    if args.first_only:
        allc = ()
    cases = []
    if args.family in ("all", "attention"):
        cases += attention_cases(dtypes, allc)
    if args.family in ("all", "gemm"):
        cases += gemm_cases(
            dtypes, tuple(args.all_configs_for.split(",")) if args.gemm_all else allc
        )
    cases = select(cases, args.filter)
    if args.limit:
        cases = cases[: args.limit]

    def log(r):
        if args.quiet:
            return
        if "error" in r:
            print(f"{r['case']:92s} ERROR {r['error']}", flush=True)
            return
        print(
            f"{r['case']:92s} regs={r['regs']:3d} spill={r['spill_bytes']} smem={r['smem']:6d} "
            f"hgmma={_fmt(r['hgmma_per_iter'])}/{r['hgmma_ideal']} work={_fmt(r['mma_work_ratio'])} "
            f"ex2={_fmt(r.get('ex2_per_elem'))} instr={_fmt(r.get('instr_per_elem'))} "
            f"wait={_fmt(r['wait_depth'])} tma={r['tma']} {r['compile_s']}s",
            flush=True,
        )

    rows = run_cases(cases, args.jobs, log)
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RECON_")}
    meta = {"_meta": {"triton": triton.__version__, "env": env, "target": "cuda:90 (sm_90a)"}}
    dest = args.json or (
        os.path.join(args.out, f"sass-triton{triton.__version__}.json") if args.out else None
    )
    if dest:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with open(dest, "w") as f:
            json.dump([meta, *rows], f, indent=1, default=str)
    if args.out:
        write_markdown(args.out)
    bad = [r for r in rows if "error" in r or r.get("spill_bytes")]
    print(
        f"triton {triton.__version__}: {len(rows)} kernels compiled for sm_90a; {len(bad)} with errors or spills"
    )
    return rc or (1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    sys.exit(main())
