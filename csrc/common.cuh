// Shared by every kernel file: dtype / head-dim dispatch (the ONE place), launch and error
// helpers, math helpers, and the warp-level tensor-core primitives.
//
// The kernels are written once and compiled two ways:
//  * by nvcc for the GPU (the extension recon_kernels._cuda), primitives as PTX inline asm;
//  * by the host C++ compiler with RECON_EMULATE defined (recon_kernels._cuda_emu, a test
//    build): emulator.h runs every CUDA thread of a block as a fiber and implements the same
//    primitives from the PTX ISA's fragment definitions, so the index math of the kernels can
//    be checked against the reference on a machine without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#ifdef RECON_EMULATE
#include "emulator.h"
#else
#include <cuda_runtime.h>
#endif

#include "launchers.h"

#define RK_DEVICE __device__ __forceinline__

namespace rk {

// --------------------------------------------------------------------------- dtypes

// The codes of recon_kernels/codes.py (DTYPE_CODES, ACT_CODES, EPI_*), shared with the
// Triton kernels; tests/test_cuda_static.py checks that these values match that table.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum ActCode : int { kActNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };
// GEMM epilogue on v = alpha * acc + bias + residual: none (c = v; c2 = act(v) when c2 is
// given), dact (c = v * act'(aux); c2 = act(aux) when given), add (c = v + aux).
enum EpiCode : int { kEpiNone = 0, kEpiDact = 1, kEpiAdd = 2 };

template <class T>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  static constexpr bool kTensorCore = false;  // fp32 runs the SIMT path (full fp32 products)
};
template <>
struct TypeInfo<__half> {
  static constexpr bool kTensorCore = true;
};
template <>
struct TypeInfo<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
};

// Elements per 16-byte chunk: the unit of every global -> shared copy (cp.async).
template <class T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Shared-memory row padding (elements): 16 bytes keeps cp.async/ldmatrix rows 16-byte
// aligned and shifts consecutive rows by 4 banks, so 8 rows of an ldmatrix (or the 8 row
// groups of a SIMT fragment read) hit distinct banks.
template <class T>
constexpr int kPad = kVec<T>;

inline std::string bad_dtype(int code) {
  return "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " +
         std::to_string(code);
}

// The ONE dtype dispatch: binds T to the element type of `code` and runs the statements.
#define RK_DISPATCH_DTYPE(code, T, ...)   \
  switch (code) {                         \
    case ::rk::kFloat32: {                \
      using T = float;                    \
      __VA_ARGS__                         \
    }                                     \
    case ::rk::kFloat16: {                \
      using T = __half;                   \
      __VA_ARGS__                         \
    }                                     \
    case ::rk::kBFloat16: {               \
      using T = __nv_bfloat16;            \
      __VA_ARGS__                         \
    }                                     \
    default:                              \
      return ::rk::bad_dtype(code);       \
  }

// The ONE head-dim dispatch: D is padded (with zeros, in shared memory only) to a bucket.
// Three buckets keep the build small; inside a bucket the kernels skip the k-steps and
// output tiles past D at run time, so D = 40 costs about what D = 48 would.
#define RK_DISPATCH_HEAD_DIM(d, kD, ...)                                              \
  if ((d) >= 1 && (d) <= 64) {                                                        \
    constexpr int kD = 64;                                                            \
    __VA_ARGS__                                                                       \
  } else if ((d) > 64 && (d) <= 128) {                                                \
    constexpr int kD = 128;                                                           \
    __VA_ARGS__                                                                       \
  } else if ((d) > 128 && (d) <= 256) {                                               \
    constexpr int kD = 256;                                                           \
    __VA_ARGS__                                                                       \
  } else {                                                                            \
    return "head dim D: expected 1 <= D <= 256, got " + std::to_string(d);            \
  }

// --------------------------------------------------------------------------- launch

#ifndef RECON_EMULATE
inline std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}
#endif

// Launches kernel(p) and turns every failure into a message naming the kernel. Every kernel
// takes one parameter struct by value, which keeps this (and the emulator) generic.
template <class P>
inline std::string launch(void (*kernel)(P), const char* name, dim3 grid, dim3 block,
                          size_t smem_bytes, uintptr_t stream, const P& p) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "";  // nothing to do
#ifdef RECON_EMULATE
  (void)stream;
  return ::rk::emu::launch(kernel, name, grid, block, smem_bytes, p);
#else
  std::string dev = device_status();
  if (!dev.empty()) return std::string(name) + ": " + dev;
  if (smem_bytes > 48 * 1024) {
    // Above 48 KiB the kernel must opt in; set every call since it is per device.
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem_bytes));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return cuda_error((std::string(name) + ": cannot reserve " +
                         std::to_string(smem_bytes) + " bytes of shared memory")
                            .c_str(),
                        e);
    }
  }
  kernel<<<grid, block, smem_bytes, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error((std::string(name) + " launch").c_str(), e);
  return "";
#endif
}

// --------------------------------------------------------------------------- conversions

template <class T>
RK_DEVICE float to_float(T x);
template <>
RK_DEVICE float to_float<float>(float x) {
  return x;
}
template <>
RK_DEVICE float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
RK_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <class T>
RK_DEVICE T from_float(float x);
template <>
RK_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
RK_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
RK_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half (the element
// with the smaller index, as mma/ldmatrix fragments expect).
template <class T>
RK_DEVICE uint32_t pack2(float lo, float hi) {
  using Raw = typename std::conditional<std::is_same<T, __half>::value, __half_raw,
                                        __nv_bfloat16_raw>::type;
  const uint16_t lb = static_cast<Raw>(from_float<T>(lo)).x;
  const uint16_t hb = static_cast<Raw>(from_float<T>(hi)).x;
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

// --------------------------------------------------------------------------- math

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

RK_DEVICE float activation(float h, int act) {
  switch (act) {
    case kGelu:
      return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.7978845608028654f * (h + 0.044715f * h * h * h);
      return 0.5f * h * (1.0f + tanhf(inner));
    }
    case kRelu:
      return h > 0.0f ? h : 0.0f;
    default:  // kActNone
      return h;
  }
}

// d activation(h) / dh: the formulas of reference.activation_grad.
RK_DEVICE float activation_grad(float h, int act) {
  switch (act) {
    case kGelu: {
      const float cdf = 0.5f * (1.0f + erff(h * 0.70710678118654752f));
      const float pdf = expf(-0.5f * h * h) * 0.3989422804014327f;
      return cdf + h * pdf;
    }
    case kGeluTanh: {
      const float c = 0.7978845608028654f;
      const float t = tanhf(c * (h + 0.044715f * h * h * h));
      return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * h * h);
    }
    case kRelu:
      return h > 0.0f ? 1.0f : 0.0f;
    default:  // kActNone
      return 1.0f;
  }
}

// --------------------------------------------------------------------------- primitives
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
// with g = lane / 4 and t = lane % 4:
//   A (16x16, row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                   a[3] = A[g+8][2t+8..]            (two 16-bit values per register)
//   B (16x8, col):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C (16x8, f32):  c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// The fp32 SIMT path keeps the same C layout so that all the softmax / epilogue code that
// works on accumulators is shared; only the "warp multiplies a tile" step differs.

#ifndef RECON_EMULATE
RK_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; bytes past src_bytes (0..16) are zero-filled, so partial
// and out-of-range chunks need no branch and no out-of-bounds read.
RK_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
RK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
RK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix x4: lane l gives the address of row l % 8 of matrix l / 8 (16 bytes each).
RK_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
RK_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

template <class T>
RK_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
RK_DEVICE void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
RK_DEVICE void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
RK_DEVICE void mma16816<float>(float (&)[4], const uint32_t (&)[4], const uint32_t (&)[2]) {
  // never called: fp32 takes the SIMT path (a specialisation keeps templates uniform)
}

RK_DEVICE float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
RK_DEVICE void syncwarp() { __syncwarp(); }
// v (the same on every lane) broadcast from lane 0: ptxas then knows it is warp-uniform and
// keeps what is computed from it (wgmma descriptors, barrier ids) in uniform registers
// instead of moving them over (R2UR) at every use (CUTLASS's canonical_warp_group_idx).
RK_DEVICE int warp_uniform(int v) { return __shfl_sync(0xffffffffu, v, 0); }
RK_DEVICE unsigned char* smem_base() {
  extern __shared__ __align__(128) unsigned char rk_smem[];
  return rk_smem;
}
// 2^x by the MUFU alone (ex2.approx.ftz: ~2 ulp, denormal results flush to 0, as with
// --use_fast_math); exp2f adds range-reduction instructions around it (a compare and two
// predicated multiplies per call)
RK_DEVICE float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#else
// (the emulator: exp2f with the .ftz flush of subnormal results)
inline float ex2_approx(float x) {
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}
using ::rk::emu::cp_async_16;
using ::rk::emu::cp_async_commit;
using ::rk::emu::cp_async_wait;
using ::rk::emu::ldsm_x4;
using ::rk::emu::ldsm_x4_trans;
using ::rk::emu::mma16816;
using ::rk::emu::shfl_xor;
using ::rk::emu::warp_uniform;
using ::rk::emu::smem_base;
using ::rk::emu::syncwarp;
#endif

RK_DEVICE int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
RK_DEVICE int warp_id() { return static_cast<int>(threadIdx.x) >> 5; }

// --------------------------------------------------------------------------- tile copies

// Copies a ROWS x COLS tile whose element (r, c) lives at src[(row0 + r) * ld + col0 + c]
// into shared memory (row stride sld), zero-filling rows >= rows_valid and columns >=
// cols_valid (the zeros make padded keys/queries/head dims contribute nothing and keep
// garbage, possibly NaN, out of the products). The caller guarantees: src 16-byte aligned,
// ld % kVec == 0, col0 % kVec == 0 (recon_kernels/cuda.py makes aligned copies otherwise).
template <class T, int ROWS, int COLS, int NTHREADS>
RK_DEVICE void load_tile_async(T* dst, int sld, const T* src, int64_t ld, int64_t row0,
                               int64_t col0, int rows_valid, int cols_valid) {
  constexpr int V = kVec<T>;
  static_assert(COLS % V == 0, "tile width must be a whole number of 16-byte chunks");
  constexpr int kChunksPerRow = COLS / V;
  constexpr int kChunks = ROWS * kChunksPerRow;
  const int tid = static_cast<int>(threadIdx.x);
  // Not unrolled on purpose: unrolled, the compiler hoists every chunk's offset out of the
  // caller's main loop and holds them in registers for its whole duration (spills).
#pragma unroll 1
  for (int it = 0; it < (kChunks + NTHREADS - 1) / NTHREADS; ++it) {
    const int i = tid + it * NTHREADS;
    if (kChunks % NTHREADS != 0 && i >= kChunks) break;
    const int r = i / kChunksPerRow;
    const int c = (i % kChunksPerRow) * V;
    int n = (r < rows_valid) ? cols_valid - c : 0;
    n = n < 0 ? 0 : (n > V ? V : n);
    // A zero-byte copy still needs a mapped address: use the tensor base.
    const T* g = n > 0 ? src + (row0 + r) * ld + col0 + c : src;
    cp_async_16(dst + r * sld + c, g, n * static_cast<int>(sizeof(T)));
  }
}

// --------------------------------------------------------------------------- warp MMA
//
// One k16 step of a warp tile: acc[mi][ni] (16 x 8 each, C layout) += A(16*MT x 16) B(16 x 8*NT).
// A is read from shared memory as A[m][k] = sA[m * lda + k] (A_T = false) or sA[k * lda + m]
// (A_T = true); B as B[k][n] = sB[n * ldb + k] (B_T = true, "NT": weights / keys stored by
// output row) or sB[k * ldb + n] (B_T = false, "NN"). Pointers point at the (m0, k0) and
// (k0, n0) corners. Pairs of n8 tiles whose first column is >= n_valid are skipped (their
// accumulators are left alone): the head-dim padding costs no MMAs.

template <class T, int MT, int NT, bool A_T, bool B_T>
RK_DEVICE void warp_mma_k16(float (&acc)[MT][NT][4], const T* sA, int lda, const T* sB, int ldb,
                            int n_valid) {
  static_assert(NT % 2 == 0, "n tiles come in pairs (one ldmatrix.x4 loads two)");
  const int lane = lane_id();
  if constexpr (TypeInfo<T>::kTensorCore) {
    const int r8 = lane & 7, mat = lane >> 3;
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      if constexpr (!A_T) {
        // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        ldsm_x4(a[mi], sA + (mi * 16 + (mat & 1) * 8 + r8) * lda + (mat >> 1) * 8);
      } else {
        // stored [k][m]: the same four matrices, transposed on load
        ldsm_x4_trans(a[mi], sA + ((mat >> 1) * 8 + r8) * lda + mi * 16 + (mat & 1) * 8);
      }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np * 16 >= n_valid) continue;
      uint32_t b4[4];
      if constexpr (B_T) {
        // stored [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        ldsm_x4(b4, sB + (np * 16 + (mat >> 1) * 8 + r8) * ldb + (mat & 1) * 8);
      } else {
        // stored [k][n]: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        ldsm_x4_trans(b4, sB + ((mat & 1) * 8 + r8) * ldb + np * 16 + (mat >> 1) * 8);
      }
      const uint32_t b0[2] = {b4[0], b4[1]};
      const uint32_t b1[2] = {b4[2], b4[3]};
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma16816<T>(acc[mi][2 * np], a[mi], b0);
        mma16816<T>(acc[mi][2 * np + 1], a[mi], b1);
      }
    }
  } else if constexpr (MT * NT <= 16) {
    // SIMT fp32: every lane computes its own C-layout elements from shared memory.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll 1
    for (int k = 0; k < 16; ++k) {
      float a[MT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int r = mi * 16 + g;
        if constexpr (!A_T) {
          a[mi][0] = to_float(sA[r * lda + k]);
          a[mi][1] = to_float(sA[(r + 8) * lda + k]);
        } else {
          a[mi][0] = to_float(sA[k * lda + r]);
          a[mi][1] = to_float(sA[k * lda + r + 8]);
        }
      }
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        if ((ni & ~1) * 8 >= n_valid) continue;
        const int c = ni * 8 + 2 * t;
        float b0, b1;
        if constexpr (B_T) {
          b0 = to_float(sB[c * ldb + k]);
          b1 = to_float(sB[(c + 1) * ldb + k]);
        } else {
          b0 = to_float(sB[k * ldb + c]);
          b1 = to_float(sB[k * ldb + c + 1]);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          acc[mi][ni][0] = fmaf(a[mi][0], b0, acc[mi][ni][0]);
          acc[mi][ni][1] = fmaf(a[mi][0], b1, acc[mi][ni][1]);
          acc[mi][ni][2] = fmaf(a[mi][1], b0, acc[mi][ni][2]);
          acc[mi][ni][3] = fmaf(a[mi][1], b1, acc[mi][ni][3]);
        }
      }
    }
  } else {
    // SIMT fp32 with a wide tile (D = 256 accumulators): one n8 tile at a time, so only its
    // operands are live next to the 128 accumulator registers (more shared loads, no spills).
    static_assert(MT == 1, "wide SIMT tiles are single-row-tile");
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
      if ((ni & ~1) * 8 >= n_valid) continue;
      const int c = ni * 8 + 2 * t;
      float c0 = acc[0][ni][0], c1 = acc[0][ni][1], c2 = acc[0][ni][2], c3 = acc[0][ni][3];
#pragma unroll 1
      for (int k = 0; k < 16; ++k) {
        float a0, a1, b0, b1;
        if constexpr (!A_T) {
          a0 = to_float(sA[g * lda + k]);
          a1 = to_float(sA[(g + 8) * lda + k]);
        } else {
          a0 = to_float(sA[k * lda + g]);
          a1 = to_float(sA[k * lda + g + 8]);
        }
        if constexpr (B_T) {
          b0 = to_float(sB[c * ldb + k]);
          b1 = to_float(sB[(c + 1) * ldb + k]);
        } else {
          b0 = to_float(sB[k * ldb + c]);
          b1 = to_float(sB[k * ldb + c + 1]);
        }
        c0 = fmaf(a0, b0, c0);
        c1 = fmaf(a0, b1, c1);
        c2 = fmaf(a1, b0, c2);
        c3 = fmaf(a1, b1, c3);
      }
      acc[0][ni][0] = c0;
      acc[0][ni][1] = c1;
      acc[0][ni][2] = c2;
      acc[0][ni][3] = c3;
    }
  }
}

// Tensor-core only: acc (16 x 8*NT) += A (16 x 16, already in registers as an A fragment) B,
// B read NN from shared memory (stored [k][n], pointer at (k0, n0)).
template <class T, int NT>
RK_DEVICE void warp_mma_k16_regA(float (&acc)[NT][4], const uint32_t (&a)[4], const T* sB, int ldb,
                                 int n_valid) {
  static_assert(NT % 2 == 0, "n tiles come in pairs");
  const int lane = lane_id();
  const int r8 = lane & 7, mat = lane >> 3;
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    if (np * 16 >= n_valid) continue;
    uint32_t b4[4];
    ldsm_x4_trans(b4, sB + ((mat & 1) * 8 + r8) * ldb + np * 16 + (mat >> 1) * 8);
    const uint32_t b0[2] = {b4[0], b4[1]};
    const uint32_t b1[2] = {b4[2], b4[3]};
    mma16816<T>(acc[2 * np], a, b0);
    mma16816<T>(acc[2 * np + 1], a, b1);
  }
}

// kPos: pass max(v, 0) on, the kept entries of a P tile whose dropped entries are negated
// (the dK/dV backward's dropout encoding); otherwise v unchanged.
template <bool kPos>
RK_DEVICE float acc_value(float v) {
  if constexpr (kPos) return fmaxf(v, 0.0f);
  return v;
}

// C-layout accumulators of n8 tiles 2j and 2j+1 (16 x 16) -> the A fragment of a k16 step
// (the FlashAttention-2 register reuse: P and dS never go through shared memory).
template <class T, bool kPos = false>
RK_DEVICE void acc_to_a_frag(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(acc_value<kPos>(c0[0]), acc_value<kPos>(c0[1]));  // row g,   k 2t..
  a[1] = pack2<T>(acc_value<kPos>(c0[2]), acc_value<kPos>(c0[3]));  // row g+8, k 2t..
  a[2] = pack2<T>(acc_value<kPos>(c1[0]), acc_value<kPos>(c1[1]));  // row g,   k 2t+8..
  a[3] = pack2<T>(acc_value<kPos>(c1[2]), acc_value<kPos>(c1[3]));  // row g+8, k 2t+8..
}

// fp32 counterpart: write a 16 x 8*NT accumulator tile to this warp's staging buffer
// (row stride ld) so the next product can read it as an A operand from shared memory.
template <int NT, bool kPos = false>
RK_DEVICE void acc_to_smem(float* s, int ld, const float (&acc)[NT][4]) {
  const int lane = lane_id();
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) {
    const int c = ni * 8 + 2 * t;
    s[g * ld + c] = acc_value<kPos>(acc[ni][0]);
    s[g * ld + c + 1] = acc_value<kPos>(acc[ni][1]);
    s[(g + 8) * ld + c] = acc_value<kPos>(acc[ni][2]);
    s[(g + 8) * ld + c + 1] = acc_value<kPos>(acc[ni][3]);
  }
}

// Sum over the 4 lanes of a quad (the lanes holding one accumulator row).
RK_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  v += shfl_xor(v, 2);
  return v;
}
RK_DEVICE float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  v = fmaxf(v, shfl_xor(v, 2));
  return v;
}

// Stores two adjacent output elements (c, c+1) of a row, skipping columns >= n. `pair_ok`
// says whether a 2-element store is aligned (row stride even and base aligned).
template <class T>
RK_DEVICE void store2(T* row, int c, int n, float v0, float v1, bool pair_ok) {
  if (pair_ok && c + 1 < n) {
    // pair_ok guarantees the 4- (8-) byte alignment of row + c
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint32_t*>(row + c) = pack2<T>(v0, v1);
    } else {
      *reinterpret_cast<float2*>(row + c) = make_float2(v0, v1);
    }
  } else {
    if (c < n) row[c] = from_float<T>(v0);
    if (c + 1 < n) row[c + 1] = from_float<T>(v1);
  }
}

}  // namespace rk
