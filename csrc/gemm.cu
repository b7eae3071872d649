// The tensor-core GEMM behind conv1d_mlp and lora_linear (shared, so both op families use
// one set of instantiations: 3 dtypes x 3 operand layouts), plus a column-sum kernel for
// bias gradients.
//
// Block tile 128 x 128 x 32, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32; a 3-stage
// (fp32: 2-stage) cp.async pipeline. Fused pieces:
//  * a second K segment accumulated first and scaled by alpha2: the rank-r LoRA term
//    (x A^T) B^T, or (dy B) A in the backward, added without forming W + s B A;
//  * the epilogue: alpha, bias, residual (merge_lora), and the MLP activation either
//    applied (forward: h and act(h) written together) or differentiated (backward:
//    dh = acc * act'(h), writing act(h) on the side for dW2 = dy^T act(h)).
#include "common.cuh"

namespace rk {

template <class T>
struct GemmCfg {
  static constexpr int kBM = 128, kBN = 128, kBK = 32;
  static constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kMT = kBM / kWarpsM / 16;  // m16 tiles per warp
  static constexpr int kNT = kBN / kWarpsN / 8;   // n8 tiles per warp
  static constexpr int kStages = TypeInfo<T>::kTensorCore ? 3 : 2;
};

template <class T, bool A_T, bool B_T>
struct GemmSmem {
  using C = GemmCfg<T>;
  // A tile stored [m][k] (A_T = false) or [k][m]; B tile [n][k] (B_T) or [k][n].
  static constexpr int kLdA = (A_T ? C::kBM : C::kBK) + kPad<T>;
  static constexpr int kLdB = (B_T ? C::kBK : C::kBN) + kPad<T>;
  static constexpr int kSizeA = (A_T ? C::kBK : C::kBM) * kLdA;
  static constexpr int kSizeB = (B_T ? C::kBN : C::kBK) * kLdB;
  static constexpr size_t kBytes = size_t(C::kStages) * (kSizeA + kSizeB) * sizeof(T);
};

template <class T, bool A_T, bool B_T>
__global__ void __launch_bounds__(GemmCfg<T>::kThreads, 1) gemm_kernel(const GemmArgs p) {
  using Cfg = GemmCfg<T>;
  using S = GemmSmem<T, A_T, B_T>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Cfg::kStages;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kThreads = Cfg::kThreads;

  T* smem = reinterpret_cast<T*>(smem_base());
  auto sA = [&](int s) { return smem + s * (S::kSizeA + S::kSizeB); };
  auto sB = [&](int s) { return smem + s * (S::kSizeA + S::kSizeB) + S::kSizeA; };

  // x walks M (tokens: the long side, up to 2^31 - 1 tiles), y walks N: consecutive blocks
  // share a weight (B) tile in L2 while they stream different rows of A.
  const int bm = static_cast<int>(blockIdx.x) * kBM;
  const int bn = static_cast<int>(blockIdx.y) * kBN;
  const int warp = warp_id(), lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int wm = (warp % Cfg::kWarpsM) * (kBM / Cfg::kWarpsM);
  const int wn = (warp / Cfg::kWarpsM) * (kBN / Cfg::kWarpsN);

  const int tiles2 = p.k2 > 0 ? (p.k2 + kBK - 1) / kBK : 0;  // second segment, done first
  const int total = tiles2 + (p.k + kBK - 1) / kBK;

  auto load = [&](int kt, int s) {
    const bool seg2 = kt < tiles2;
    const T* a = reinterpret_cast<const T*>(seg2 ? p.a2 : p.a);
    const T* b = reinterpret_cast<const T*>(seg2 ? p.b2 : p.b);
    const int64_t lda = seg2 ? p.lda2 : p.lda, ldb = seg2 ? p.ldb2 : p.ldb;
    const int kdim = seg2 ? p.k2 : p.k;
    const int k0 = (seg2 ? kt : kt - tiles2) * kBK;
    if constexpr (!A_T)
      load_tile_async<T, kBM, kBK, kThreads>(sA(s), S::kLdA, a, lda, bm, k0, p.m - bm, kdim - k0);
    else
      load_tile_async<T, kBK, kBM, kThreads>(sA(s), S::kLdA, a, lda, k0, bm, kdim - k0, p.m - bm);
    if constexpr (B_T)
      load_tile_async<T, kBN, kBK, kThreads>(sB(s), S::kLdB, b, ldb, bn, k0, p.n - bn, kdim - k0);
    else
      load_tile_async<T, kBK, kBN, kThreads>(sB(s), S::kLdB, b, ldb, k0, bn, kdim - k0, p.n - bn);
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load(s, s);
    cp_async_commit();  // empty groups keep the wait count below uniform
  }

  float acc[kMT][kNT][4];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
    }
  }

  for (int kt = 0; kt < total; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed
    __syncthreads();               // ... for every thread; and stage (kt - 1) is free
    if (kt + kStages - 1 < total) load(kt + kStages - 1, (kt + kStages - 1) % kStages);
    cp_async_commit();

    const T* a_s = sA(kt % kStages);
    const T* b_s = sB(kt % kStages);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const T* a_w = A_T ? a_s + kk * 16 * S::kLdA + wm : a_s + wm * S::kLdA + kk * 16;
      const T* b_w = B_T ? b_s + wn * S::kLdB + kk * 16 : b_s + kk * 16 * S::kLdB + wn;
      warp_mma_k16<T, kMT, kNT, A_T, B_T>(acc, a_w, S::kLdA, b_w, S::kLdB, kBN);
    }
    if (kt == tiles2 - 1) {  // end of the second segment: apply its scale once
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] *= p.alpha2;
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Epilogue through shared memory, half a block tile (64 rows) at a time: the accumulators
  // are parked as fp32, then each thread finishes consecutive columns (coalesced stores),
  // in a loop that is not unrolled, so the activation code exists once, not once per
  // accumulator register.
  constexpr int kLdC = kBN + 4;
  float* sC = reinterpret_cast<float*>(smem);
  static_assert(size_t(kBM / 2) * kLdC * sizeof(float) <= S::kBytes, "epilogue tile must fit");
  T* c = reinterpret_cast<T*>(p.c);
  T* c2 = reinterpret_cast<T*>(p.c2);
  const T* bias = reinterpret_cast<const T*>(p.bias);
  const T* res = reinterpret_cast<const T*>(p.residual);
  const T* aux = reinterpret_cast<const T*>(p.aux);
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (wm == half * (kBM / 2)) {
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = mi * 16 + g + 8 * (e >> 1);
            const int col = wn + ni * 8 + 2 * t + (e & 1);
            sC[r * kLdC + col] = acc[mi][ni][e];
          }
        }
      }
    }
    __syncthreads();
#pragma unroll 1
    for (int idx = tid; idx < (kBM / 2) * kBN; idx += kThreads) {
      const int r = bm + half * (kBM / 2) + idx / kBN;
      const int col = bn + idx % kBN;
      if (r >= p.m || col >= p.n) continue;
      float v = p.alpha * sC[(idx / kBN) * kLdC + idx % kBN];
      if (bias != nullptr) v += to_float(bias[col]);
      if (res != nullptr) v += to_float(res[r * p.ldr + col]);
      if (p.epi == kEpiDact) {
        const float hv = to_float(aux[r * p.ldaux + col]);
        v *= activation_grad(hv, p.act);
        if (c2 != nullptr) c2[r * p.ldc2 + col] = from_float<T>(activation(hv, p.act));
      } else {
        if (p.epi == kEpiAdd) v += to_float(aux[r * p.ldaux + col]);
        if (c2 != nullptr) c2[r * p.ldc2 + col] = from_float<T>(activation(v, p.act));
      }
      c[r * p.ldc + col] = from_float<T>(v);
    }
    __syncthreads();  // before the other half overwrites sC
  }
}

struct ColsumArgs {
  uint64_t x, out;
  int64_t ldx;
  int m, n;
};

// out[n] = sum over rows; 32 columns x 8 row groups per block, fixed summation order
// (deterministic, no atomics).
template <class T>
__global__ void __launch_bounds__(256) colsum_kernel(const ColsumArgs p) {
  float* red = reinterpret_cast<float*>(smem_base());  // [8][33]
  const int tx = static_cast<int>(threadIdx.x) & 31, ty = static_cast<int>(threadIdx.x) >> 5;
  const int col = static_cast<int>(blockIdx.x) * 32 + tx;
  const T* x = reinterpret_cast<const T*>(p.x);
  float acc = 0.0f;
  if (col < p.n) {
    for (int64_t r = ty; r < p.m; r += 8) acc += to_float(x[r * p.ldx + col]);
  }
  red[ty * 33 + tx] = acc;
  __syncthreads();
  if (ty == 0 && col < p.n) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += red[i * 33 + tx];
    reinterpret_cast<T*>(p.out)[col] = from_float<T>(s);
  }
}

template <class T, bool A_T, bool B_T>
static std::string launch_gemm(const GemmArgs& g, dim3 grid, uintptr_t stream) {
  return launch(gemm_kernel<T, A_T, B_T>, "gemm", grid, dim3(GemmCfg<T>::kThreads),
                GemmSmem<T, A_T, B_T>::kBytes, stream, g);
}

static std::string check_operand(const char* name, uint64_t ptr, int64_t ld, int vec) {
  if (ptr == 0) return std::string("gemm: ") + name + " is a null pointer";
  if (ptr % 16 != 0 || ld % vec != 0)
    return std::string("gemm: ") + name + ": expected a 16-byte aligned pointer and a row stride " +
           "that is a multiple of " + std::to_string(vec) + " elements, got address " +
           std::to_string(ptr) + " and stride " + std::to_string(ld);
  return "";
}

std::string gemm(const GemmArgs& g, uintptr_t stream) {
  if (g.m < 1 || g.n < 1 || g.k < 1 || g.k2 < 0)
    return "gemm: expected M, N, K >= 1 and K2 >= 0, got M=" + std::to_string(g.m) +
           " N=" + std::to_string(g.n) + " K=" + std::to_string(g.k) +
           " K2=" + std::to_string(g.k2);
  if (g.dtype != kFloat32 && g.dtype != kFloat16 && g.dtype != kBFloat16)
    return bad_dtype(g.dtype);
  const int vec = g.dtype == kFloat32 ? 4 : 8;
  std::string err = check_operand("A", g.a, g.lda, vec);
  if (err.empty()) err = check_operand("B", g.b, g.ldb, vec);
  if (err.empty() && g.k2 > 0) err = check_operand("A2", g.a2, g.lda2, vec);
  if (err.empty() && g.k2 > 0) err = check_operand("B2", g.b2, g.ldb2, vec);
  if (!err.empty()) return err;
  if (g.c == 0) return "gemm: C is a null pointer";
  if (g.epi < kEpiNone || g.epi > kEpiAdd)
    return "gemm: epilogue code must be 0 (none), 1 (dact) or 2 (add), got " + std::to_string(g.epi);
  if (g.epi != kEpiNone && g.aux == 0)
    return "gemm: epilogue " + std::to_string(g.epi) + " needs aux (the pre-activation or addend)";
  if (g.act < kActNone || g.act > kRelu)
    return "gemm: activation code must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (relu), got " +
           std::to_string(g.act);
  const int64_t gx = (int64_t(g.m) + 127) / 128, gy = (int64_t(g.n) + 127) / 128;
  if (gy > 65535) return "gemm: N = " + std::to_string(g.n) + " too large (at most 8388480)";
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const int layout = g.a_trans * 2 + g.b_trans;
  RK_DISPATCH_DTYPE(g.dtype, T, {
    switch (layout) {
      case 1:
        return launch_gemm<T, false, true>(g, grid, stream);  // A [m][k], B [n][k]
      case 0:
        return launch_gemm<T, false, false>(g, grid, stream);  // A [m][k], B [k][n]
      case 2:
        return launch_gemm<T, true, false>(g, grid, stream);  // A [k][m], B [k][n]
      default:
        return "gemm: unsupported operand layout a_trans=" + std::to_string(g.a_trans) +
               " b_trans=" + std::to_string(g.b_trans);
    }
  })
}

std::string colsum(uint64_t x, int64_t ldx, int m, int n, uint64_t out, int dtype,
                   uintptr_t stream) {
  if (x == 0 || out == 0) return "colsum: null pointer";
  if (m < 1 || n < 1) return "colsum: expected M, N >= 1";
  const ColsumArgs p{x, out, ldx, m, n};
  const dim3 grid(static_cast<unsigned>((n + 31) / 32));
  RK_DISPATCH_DTYPE(dtype, T,
                    return launch(colsum_kernel<T>, "colsum", grid, dim3(256),
                                  8 * 33 * sizeof(float), stream, p);)
}

}  // namespace rk
