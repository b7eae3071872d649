// Pieces shared by the attention forward and backward kernels: tile configurations per
// (dtype, head-dim bucket), the mask predicate, and host-side argument checks.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace rk {

// The forwards' exponent shift of a row before any allowed key (the shift m: p = 2^(x - m),
// lazily the running max; attention_fwd.cu, attention_fwd_sm90.cu): -FLT_MAX, finite, so
// 2^(kNoShift - m) = 0 for the first real shift m and x - kNoShift is never NaN; at or
// below every finite score.
inline constexpr float kNoShift = -3.402823466e+38f;

// Forward (the sm_80 path; sm_90 runs it too where no wgmma path applies): 4 warps, each
// owning kMT m16 row tiles, sweep the keys kBlockN at a time with K/V double-buffered
// (cp.async: tile j+1 loads while tile j computes), in online-softmax steps of kSubN keys.
//  * fp16/bf16, D <= 128: 32 rows per warp (kMT = 2), 128-row Q tiles, Q fragments held in
//    registers for the whole sweep: every K/V fragment read from shared memory feeds two
//    m16 tiles, so a warp reads 2 * N * D * 2 bytes per 4 * 32 * N * D FLOPs = 0.031 B/FLOP
//    (was 0.070: 16 rows per warp, Q re-read every tile; tests/test_cuda_static.py).
//    Registers per lane at D = 128: Q 64 + O 128 + S 2 * kSubN: with 32-key steps ptxas
//    spills (28 bytes at 255 registers), 16-key steps need 243: 32-key tiles (one barrier
//    per 32 keys) in two softmax steps. D <= 64: 64-key tiles and steps.
//  * fp16/bf16, D = 256: the O accumulator alone is 128 registers per 16 rows, so 16 rows
//    per warp (64-row tiles), Q still in registers, 32-key tiles (0.0625 B/FLOP).
//  * fp32 (SIMT, full fp32 products): 16 rows per warp, Q read from shared memory; 32-key
//    tiles at D = 64, 16-key tiles above keep the double buffers of fp32 within what
//    the single-buffered 64/32-key tiles used (two blocks per SM up to D = 128).
template <class T, int kD>
struct FwdCfg {
  static constexpr bool kTC = TypeInfo<T>::kTensorCore;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMT = (kTC && kD <= 128) ? 2 : 1;  // m16 row tiles per warp
  static constexpr int kRowsPerWarp = 16 * kMT;
  static constexpr int kBlockM = kRowsPerWarp * kWarps;
  static constexpr bool kQInRegs = kTC;
  static constexpr int kBlockN = kTC ? (kD <= 64 ? 64 : 32) : (kD <= 64 ? 32 : 16);
  // keys per online-softmax step (divides kBlockN): 16 at D = 128 (fp16/bf16), see above
  static constexpr int kSubN = (kTC && kD > 64 && kD <= 128) ? 16 : kBlockN;
  static constexpr int kStages = 2;           // K/V buffers
  static constexpr int kLd = kD + kPad<T>;    // shared row stride of the Q/K/V tiles
  static constexpr int kLdS = kSubN + 4;      // fp32 staging row stride of P
  static constexpr size_t kSmemBytes =
      size_t(kBlockM + 2 * kStages * kBlockN) * kLd * sizeof(T) +
      (kTC ? 0 : size_t(kWarps) * 16 * kLdS * sizeof(float));
  static_assert(kTC || kMT == 1, "the SIMT path is single-row-tile");
};

// Backward: a block owns kBlockRows rows (keys for the dK/dV kernel, kKV = true; queries
// for the dQ kernel) and sweeps the other side kBlockCols at a time, double-buffered (the
// tiles of the next step load while this one computes) where shared memory allows (all
// but fp32 at D = 256). Register budget (255 per thread, no spills): the dK/dV kernel holds
// two accumulators, so its steps are narrower past D = 64; D = 256 computes dV and dK in
// separate sweeps so that one 16 x 256 accumulator per warp is live; fp32 at D = 256 (SIMT,
// more live operands) also splits the output columns in two halves (kAccD), recomputing S
// and dP per half.
template <class T, int kD, bool kKV>
struct BwdCfg {
  static constexpr bool kTC = TypeInfo<T>::kTensorCore;
  static constexpr int kWarps = (!kTC && kD >= 256) ? 2 : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockRows = 16 * kWarps;
  static constexpr int kBlockCols = kD <= 64 ? 64 : (kKV ? 16 : 32);
  static constexpr int kStages = (!kTC && kD >= 256) ? 1 : 2;  // buffers of the swept side
  static constexpr bool kTwoPass = kD >= 256;
  static constexpr int kAccD = (!kTC && kD >= 256) ? kD / 2 : kD;
  static constexpr int kLd = kD + kPad<T>;
  static constexpr int kLdS = kBlockCols + 4;
  // rows tiles (2) + swept tiles (2 per stage) + lse/delta per stage (dK/dV) + fp32 staging
  static constexpr size_t kSmemBytes =
      size_t(2 * kBlockRows + 2 * kStages * kBlockCols) * kLd * sizeof(T) +
      (kKV ? size_t(2 * kStages * kBlockCols) * sizeof(float) : 0) +
      (kTC ? 0 : size_t(kWarps) * 16 * kLdS * sizeof(float));
};

// Which (query i, key j) pairs may attend, for one (batch, head).
struct MaskView {
  const uint8_t* mask;  // at (b, h); element (i, j) at mask[i * m_sm + j * m_sn]
  int64_t m_sm, m_sn;
  const uint8_t* kpm;  // at b; key j at kpm[j * kpm_sn]
  int64_t kpm_sn;
  int kv_lo;          // with kpm: keys j < kv_lo are all real (AttnArgs::kpm_bounds)
  int nq, nk, shift;  // shift = Nk - Nq: causal lets query i see keys j <= i + shift
  bool causal;

  RK_DEVICE bool allowed(int i, int j) const {
    if (i >= nq || j >= nk) return false;
    if (causal && j > i + shift) return false;
    if (kpm != nullptr && kpm[j * kpm_sn] == 0) return false;
    if (mask != nullptr && mask[i * m_sm + j * m_sn] == 0) return false;
    return true;
  }
  // True when every pair of queries [i0, i1) x keys below j1 is allowed, so a tile can
  // skip the per-element test.
  RK_DEVICE bool all_allowed(int i0, int i1, int j1) const {
    if (mask != nullptr || (kpm != nullptr && j1 > kv_lo)) return false;
    if (i1 > nq || j1 > nk) return false;
    return !causal || j1 - 1 <= i0 + shift;
  }
};

// One past the last key any query of sequence b may attend to under the key padding mask
// (p.nk without one): the kernels sweeping keys stop there; 0 for an all-padding sequence.
RK_DEVICE int kpm_key_end(const AttnArgs& p, int64_t b) {
  if (p.kpm == 0 || p.kpm_bounds == 0) return p.nk;
  return reinterpret_cast<const int*>(p.kpm_bounds)[2 * b + 1];
}

RK_DEVICE MaskView make_mask_view(const AttnArgs& p, int64_t b, int64_t h) {
  MaskView mv;
  mv.mask = p.mask ? reinterpret_cast<const uint8_t*>(p.mask) + b * p.m_sb + h * p.m_sh : nullptr;
  mv.m_sm = p.m_sm;
  mv.m_sn = p.m_sn;
  mv.kpm = p.kpm ? reinterpret_cast<const uint8_t*>(p.kpm) + b * p.kpm_sb : nullptr;
  mv.kpm_sn = p.kpm_sn;
  // without bounds (a caller that did not compute them) every tile takes the element test
  mv.kv_lo = p.kpm_bounds ? reinterpret_cast<const int*>(p.kpm_bounds)[2 * b] : 0;
  mv.nq = p.nq;
  mv.nk = p.nk;
  mv.shift = p.nk - p.nq;
  mv.causal = p.causal;
  return mv;
}

// Attention dropout: the keep mask is a counter-based hash of (batch, head, query, key),
// the one of recon_kernels/reference.py (dropout_keep), so no RNG state is carried and the
// forward and both backward kernels draw the same mask:
//   key(b, h) = mix32(seed + (b * H + h) * 0x9E3779B9), r = mix32((i * Nk + j) ^ key),
//   keep <=> (r >> 8) >= threshold (threshold = round(p * 2^24); 0 means no dropout).
RK_DEVICE uint32_t mix32(uint32_t x) {  // lowbias32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct DropoutView {
  uint32_t key, nk, threshold;
  float scale;  // 1 / (1 - p), applied to the kept probabilities

  RK_DEVICE bool on() const { return threshold != 0; }  // uniform over the grid
  // i: query row, j: key column (any ints: padding rows/columns hash too, harmlessly)
  RK_DEVICE bool keep(int i, int j) const {
    return keep_at(static_cast<uint32_t>(i) * nk + static_cast<uint32_t>(j));
  }
  // idx = i * Nk + j (mod 2^32): lets a caller step through a tile by additions
  RK_DEVICE bool keep_at(uint32_t idx) const { return (mix32(idx ^ key) >> 8) >= threshold; }
};

RK_DEVICE DropoutView make_dropout_view(const AttnArgs& p, int64_t bh) {
  DropoutView dv;
  dv.key = mix32(p.drop_seed + static_cast<uint32_t>(bh) * 0x9E3779B9u);
  dv.nk = static_cast<uint32_t>(p.nk);
  dv.threshold = p.drop_threshold;
  dv.scale = p.drop_scale;
  return dv;
}

template <int M, int N>
RK_DEVICE void zero(float (&acc)[M][N][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][i][e] = 0.0f;
    }
  }
}

// Writes a warp's 16-row accumulator tile (scaled) to out rows row0, row0 + 8 (row stride
// ld, unit column stride), columns < d, rows < nrows.
template <class T, int N>
RK_DEVICE void store_rows(T* out, int64_t ld, int row0, int nrows, int d,
                          const float (&acc)[1][N][4], float scale0, float scale1,
                          bool pair_ok) {
  const int t = lane_id() & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + half * 8;
    if (r >= nrows) continue;
    const float s = half ? scale1 : scale0;
    T* row = out + r * ld;
#pragma unroll
    for (int ni = 0; ni < N; ++ni) {
      if (ni * 8 >= d) continue;
      store2<T>(row, ni * 8 + 2 * t, d, acc[0][ni][2 * half] * s, acc[0][ni][2 * half + 1] * s,
                pair_ok);
    }
  }
}

// ------------------------------------------------------------------ host-side checks

struct Operand {
  const char* name;
  uint64_t ptr;
  int64_t sb, sh, sm;
};

// Every (B, H, N, D) operand that is copied in 16-byte chunks.
inline std::string check_aligned(const Operand& op, int vec) {
  const char* name = op.name;
  const uint64_t ptr = op.ptr;
  const int64_t sb = op.sb, sh = op.sh, sm = op.sm;
  if (ptr == 0) return std::string(name) + ": null pointer";
  if (ptr % 16 != 0)
    return std::string(name) + ": expected a 16-byte aligned data pointer, got address " +
           std::to_string(ptr);
  if (sb % vec != 0 || sh % vec != 0 || sm % vec != 0)
    return std::string(name) + ": expected batch/head/row strides that are multiples of " +
           std::to_string(vec) + " elements (16 bytes), got (" + std::to_string(sb) + ", " +
           std::to_string(sh) + ", " + std::to_string(sm) + ")";
  return "";
}

// "" when this process can run the sm_90a kernels (build and device), else why not.
inline std::string sm90_unavailable() {
#ifdef RECON_EMULATE
  return "the emulator runs the portable kernels unless path = 2 asks for sm_90a";
#else
  if (std::string(RK_CUDA_ARCHS).find("90a") == std::string::npos)
    return "the extension was not built for sm_90a (RECON_CUDA_ARCHS=" RK_CUDA_ARCHS ")";
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return "no usable CUDA device";
  }
  if (major != 9 || minor != 0)
    return "the GPU is sm_" + std::to_string(major) + std::to_string(minor) + ", not sm_90";
  return "";
#endif
}

inline std::string check_attn_common(const AttnArgs& a) {
  if (a.b < 1 || a.h < 1 || a.nq < 1 || a.nk < 1)
    return "attention: expected B, H, Nq, Nk >= 1, got B=" + std::to_string(a.b) +
           " H=" + std::to_string(a.h) + " Nq=" + std::to_string(a.nq) +
           " Nk=" + std::to_string(a.nk);
  if (a.d < 1 || a.d > 256)
    return "attention: head dim D must be in [1, 256], got " + std::to_string(a.d);
  if (!std::isfinite(a.scale)) return "attention: scale must be finite";
  if (a.drop_threshold > (1u << 24))
    return "attention: drop_threshold must be in [0, 2^24], got " +
           std::to_string(a.drop_threshold);
  if (!std::isfinite(a.drop_scale) || a.drop_scale < 1.0f)
    return "attention: drop_scale (1 / (1 - dropout_p)) must be finite and >= 1";
  return "";
}

}  // namespace rk
