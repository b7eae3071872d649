// The host-side API of the extension: plain argument structs and launchers, no CUDA or
// torch types, so bindings.cpp compiles with the host compiler and pybind11 alone.
//
// Pointers are device addresses as integers (torch's Tensor.data_ptr()); strides are in
// elements; every launcher returns "" on success or the error message (bindings.cpp raises
// it as RuntimeError). recon_kernels/cuda.py validates everything before calling: shapes,
// dtypes, devices, unit stride of the last dim and 16-byte alignment of every row that is
// copied with 16-byte vectors (it makes aligned copies when needed). The launchers check
// again what would otherwise make a kernel read or write out of bounds.
//
// The fields are listed once (X-macros) so that bindings.cpp exposes exactly these names;
// setting a misspelt field from Python raises AttributeError.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#define RK_DECLARE_FIELD(type, name, init) type name = init;

// Attention forward and backward. q (B, H, Nq, D); k, v (B, H, Nk, D); o/dout/dq like q;
// dk/dv like k (all with unit stride in D); lse float32 (B, H, Nq) through strides; delta a
// contiguous float32 (B, H, Nq) workspace; mask uint8 (B, H, Nq, Nk) through strides (0 on
// broadcast dims); kpm uint8 (B, Nk). Absent masks: pointer 0. scale multiplies q k^T.
// pingpong (sm_90a forward, two consumer warpgroups): the warpgroups take turns issuing
// their GEMMs (FlashAttention-3's schedule: one's softmax under the other's GEMMs).
// kpm_bounds (with kpm): int32 (B, 2), per sequence the number of leading real keys (keys
// below it are all real) and one past its last real key (keys from it on are all padding):
// tiles below the first skip the per-element test, key blocks from the second are skipped.
// Dropout of the attention probabilities (recon_kernels/reference.py, dropout_keep):
// drop_threshold = round(p * 2^24) in [0, 2^24] (0: no dropout), drop_seed the uint32 seed,
// drop_scale = 1 / (1 - p).
// path (forward): 0 auto (the sm_90a kernel on an sm_90 GPU when the build has it and the
// arguments allow it, else the portable one), 1 the portable (sm_80) kernel, 2 the sm_90a
// kernel wherever the arguments allow it (fp16/bf16, strides TMA can describe), the portable
// one otherwise; an error when the build or the device has no sm_90a (the emulator runs it
// on the CPU).
#define RK_ATTN_FIELDS(X)                                                                  \
  X(uint64_t, q, 0) X(uint64_t, k, 0) X(uint64_t, v, 0) X(uint64_t, o, 0)                  \
  X(uint64_t, lse, 0) X(uint64_t, dout, 0) X(uint64_t, delta, 0) X(uint64_t, dq, 0)        \
  X(uint64_t, dk, 0) X(uint64_t, dv, 0) X(uint64_t, mask, 0) X(uint64_t, kpm, 0)           \
  X(int64_t, q_sb, 0) X(int64_t, q_sh, 0) X(int64_t, q_sm, 0)                              \
  X(int64_t, k_sb, 0) X(int64_t, k_sh, 0) X(int64_t, k_sm, 0)                              \
  X(int64_t, v_sb, 0) X(int64_t, v_sh, 0) X(int64_t, v_sm, 0)                              \
  X(int64_t, o_sb, 0) X(int64_t, o_sh, 0) X(int64_t, o_sm, 0)                              \
  X(int64_t, do_sb, 0) X(int64_t, do_sh, 0) X(int64_t, do_sm, 0)                           \
  X(int64_t, dq_sb, 0) X(int64_t, dq_sh, 0) X(int64_t, dq_sm, 0)                           \
  X(int64_t, dk_sb, 0) X(int64_t, dk_sh, 0) X(int64_t, dk_sm, 0)                           \
  X(int64_t, dv_sb, 0) X(int64_t, dv_sh, 0) X(int64_t, dv_sm, 0)                           \
  X(int64_t, lse_sb, 0) X(int64_t, lse_sh, 0) X(int64_t, lse_sm, 0)                        \
  X(int64_t, m_sb, 0) X(int64_t, m_sh, 0) X(int64_t, m_sm, 0) X(int64_t, m_sn, 0)          \
  X(int64_t, kpm_sb, 0) X(int64_t, kpm_sn, 0)                                              \
  X(int, b, 0) X(int, h, 0) X(int, nq, 0) X(int, nk, 0) X(int, d, 0)                       \
  X(float, scale, 1.0f) X(bool, causal, false) X(int, dtype, 0)                            \
  X(uint32_t, drop_seed, 0) X(uint32_t, drop_threshold, 0) X(float, drop_scale, 1.0f)      \
  X(int, path, 0) X(uint64_t, dq_accum, 0) X(bool, deterministic, false)                  \
  X(float, lazy_log2, 8.0f) X(uint64_t, kpm_bounds, 0) X(bool, pingpong, false)

// The GEMM behind conv1d_mlp and lora_linear:
//   C[m][n] = epilogue(alpha * (sum_k A[m][k] B[k][n] + alpha2 * sum_k A2[m][k] B2[k][n]))
// A[m][k] = a[m * lda + k] (a_trans = 0) or a[k * lda + m] (a_trans = 1);
// B[k][n] = b[n * ldb + k] (b_trans = 1, nn.Linear weight layout) or b[k * ldb + n] (0).
// The optional second K segment (k2 > 0, same layouts) is the rank-r LoRA term.
// v = alpha * acc + bias[n] + residual[m][n]; epi (EpiCode, recon_kernels/codes.py):
// 0: c = v, and c2 = act(v) when c2 != 0 (MLP forward); 1 (MLP backward):
// c = v * act'(aux[m][n]), c2 = act(aux) when c2 != 0; 2: c = v + aux[m][n].
#define RK_GEMM_FIELDS(X)                                                                 \
  X(uint64_t, a, 0) X(uint64_t, b, 0) X(uint64_t, a2, 0) X(uint64_t, b2, 0)               \
  X(uint64_t, c, 0) X(uint64_t, c2, 0) X(uint64_t, bias, 0) X(uint64_t, residual, 0)      \
  X(uint64_t, aux, 0)                                                                     \
  X(int64_t, lda, 0) X(int64_t, ldb, 0) X(int64_t, lda2, 0) X(int64_t, ldb2, 0)           \
  X(int64_t, ldc, 0) X(int64_t, ldc2, 0) X(int64_t, ldr, 0) X(int64_t, ldaux, 0)          \
  X(int, m, 0) X(int, n, 0) X(int, k, 0) X(int, k2, 0)                                    \
  X(float, alpha, 1.0f) X(float, alpha2, 1.0f)                                            \
  X(int, a_trans, 0) X(int, b_trans, 1) X(int, epi, 0) X(int, act, 0) X(int, dtype, 0)

// conv1d_mlp: x (M, C), w1 (hidden, C), w2 (C_out, hidden), row-major with the given row
// strides; outputs and the act(h) / dh workspaces (M, hidden) likewise. b1/b2/db1/db2 are
// contiguous vectors, 0 when absent.
#define RK_MLP_FIELDS(X)                                                                   \
  X(uint64_t, x, 0) X(uint64_t, w1, 0) X(uint64_t, b1, 0) X(uint64_t, w2, 0)               \
  X(uint64_t, b2, 0) X(uint64_t, y, 0) X(uint64_t, h, 0) X(uint64_t, act_h, 0)             \
  X(uint64_t, dy, 0) X(uint64_t, dx, 0) X(uint64_t, dw1, 0) X(uint64_t, db1, 0)            \
  X(uint64_t, dw2, 0) X(uint64_t, db2, 0) X(uint64_t, dh, 0)                               \
  X(int64_t, ldx, 0) X(int64_t, ldw1, 0) X(int64_t, ldw2, 0) X(int64_t, ldy, 0)            \
  X(int64_t, ldh, 0) X(int64_t, ld_act_h, 0) X(int64_t, lddy, 0) X(int64_t, lddx, 0)       \
  X(int64_t, lddw1, 0) X(int64_t, lddw2, 0) X(int64_t, lddh, 0)                            \
  X(int, m, 0) X(int, c, 0) X(int, hidden, 0) X(int, c_out, 0) X(int, act, 0)              \
  X(int, dtype, 0)

// lora_linear: x (M, in), w (out, in), la = lora_a (r, in), lb = lora_b (out, r); xa (M, r)
// and the dyb = dy lora_b workspace (M, r). merge_lora writes w + scale * lb la to y.
#define RK_LORA_FIELDS(X)                                                                  \
  X(uint64_t, x, 0) X(uint64_t, w, 0) X(uint64_t, bias, 0) X(uint64_t, la, 0)              \
  X(uint64_t, lb, 0) X(uint64_t, y, 0) X(uint64_t, xa, 0) X(uint64_t, dy, 0)               \
  X(uint64_t, dx, 0) X(uint64_t, dw, 0) X(uint64_t, dbias, 0) X(uint64_t, dla, 0)          \
  X(uint64_t, dlb, 0) X(uint64_t, dyb, 0)                                                  \
  X(int64_t, ldx, 0) X(int64_t, ldw, 0) X(int64_t, ldla, 0) X(int64_t, ldlb, 0)            \
  X(int64_t, ldy, 0) X(int64_t, ldxa, 0) X(int64_t, lddy, 0) X(int64_t, lddx, 0)           \
  X(int64_t, lddw, 0) X(int64_t, lddla, 0) X(int64_t, lddlb, 0) X(int64_t, lddyb, 0)       \
  X(int, m, 0) X(int, in, 0) X(int, out, 0) X(int, r, 0) X(float, scale, 1.0f)             \
  X(int, dtype, 0)

namespace rk {

struct AttnArgs {
  RK_ATTN_FIELDS(RK_DECLARE_FIELD)
};
struct GemmArgs {
  RK_GEMM_FIELDS(RK_DECLARE_FIELD)
};
struct MlpArgs {
  RK_MLP_FIELDS(RK_DECLARE_FIELD)
};
struct LoraArgs {
  RK_LORA_FIELDS(RK_DECLARE_FIELD)
};

std::string attention_fwd(const AttnArgs& a, uintptr_t stream);
// The tile configuration attention_fwd launches for (dtype code, head dim), from FwdCfg (csrc/
// attention_common.cuh): for tests and reports, instead of parsing the sources.
struct AttnFwdTiles {
  int head_dim_bucket, block_m, block_n, sub_n, warps, rows_per_warp, stages, q_in_regs;
  int64_t smem_bytes;
};
std::string attention_fwd_tiles(int dtype, int d, AttnFwdTiles* out);
// Which forward kernel attention_fwd runs for these arguments: "sm90", or "sm80: <why not
// sm90>" (csrc/attention_fwd_sm90.cu).
std::string attention_fwd_choice(const AttnArgs& a);
std::string attention_fwd_sm90(const AttnArgs& a, uintptr_t stream);
std::string attention_fwd_sm90_why_not(const AttnArgs& a);
// The backward likewise ("sm90" or "sm80: <why>"); the sm_90a backward accumulates dQ by
// bulk float reductions into dq_accum, a zeroed float32 workspace of
// attention_bwd_workspace(a) elements (tiles of 64 queries x 64 columns, in the order of
// csrc/attention_bwd_sm90.cu's DqTile, then one int32 counter per tile that orders the
// reductions when a.deterministic).
std::string attention_bwd_choice(const AttnArgs& a);
int64_t attention_bwd_workspace(const AttnArgs& a);
std::string attention_bwd_sm90(const AttnArgs& a, uintptr_t stream);
std::string attention_bwd_sm90_why_not(const AttnArgs& a);

#ifdef RECON_EMULATE
// Emulator builds: (kernel name, launches) since load (tests check which kernel ran).
std::vector<std::pair<std::string, int64_t>> emu_launch_counts();
#endif
std::string attention_bwd(const AttnArgs& a, uintptr_t stream);
std::string gemm(const GemmArgs& g, uintptr_t stream);
// The operand part of a GEMM call: C (m x n, row stride ldc) = op(A) op(B), op(X) = X^T when
// *_trans; epilogue fields keep their defaults for the caller to set.
inline GemmArgs gemm_args(uint64_t a, int64_t lda, int a_trans, uint64_t b, int64_t ldb,
                          int b_trans, int m, int n, int k, uint64_t c, int64_t ldc, int dtype) {
  GemmArgs g;
  g.a = a;
  g.lda = lda;
  g.a_trans = a_trans;
  g.b = b;
  g.ldb = ldb;
  g.b_trans = b_trans;
  g.m = m;
  g.n = n;
  g.k = k;
  g.c = c;
  g.ldc = ldc;
  g.dtype = dtype;
  return g;
}
// out[n] = sum_m x[m * ldx + n] (float32 accumulation, fixed order), out in x's dtype.
std::string colsum(uint64_t x, int64_t ldx, int m, int n, uint64_t out, int dtype,
                   uintptr_t stream);
std::string conv1d_mlp_fwd(const MlpArgs& a, uintptr_t stream);
std::string conv1d_mlp_bwd(const MlpArgs& a, uintptr_t stream);
std::string lora_linear_fwd(const LoraArgs& a, uintptr_t stream);
std::string lora_linear_bwd(const LoraArgs& a, uintptr_t stream);
std::string merge_lora(const LoraArgs& a, uintptr_t stream);

// "" when a CUDA device can run the kernels, else why not (never crashes without a GPU or
// driver). Defined in bindings.cpp; every launch checks it first.
std::string device_status();

// Self-test of the Hopper primitives (csrc/hopper_selftest.cu): out (64 x n, f32) = A B^T
// of A (rows_a x 64) and B (rows_b x 64), 16-bit, contiguous, zero-padded to 64 / n rows.
std::string hopper_selftest(int mode, int dtype, int n, int swizzle, uint64_t a, int rows_a,
                            uint64_t b, int rows_b, uint64_t out, uint64_t out2);
// Self-test of the global flags (flag_wait_ge / flag_release_add): `blocks` blocks take turns
// on one int32 counter (zeroed), block b at turn b (reverse: blocks - 1 - b, emulator only:
// every block must be resident) writing order[turn] = b.
std::string flag_selftest(uint64_t counter, uint64_t order, int blocks, bool reverse);

}  // namespace rk
