// Attention backward, atomic-free, with recomputation (FlashAttention-2 formulas):
//   delta_i = sum_d dO_id O_id                             (attn_bwd_delta_kernel)
//   P = exp2(S * scale * log2 e - lse * log2 e), 0 where masked
//   dV = P^T dO, dK = scale * dS^T Q with dS = P o (dO V^T - delta)   (one block per key block)
//   dQ = scale * dS K                                      (one block per query block)
// The dK/dV pass works on transposed tiles (rows = keys) so that P^T and dS^T are already in
// the accumulator layout that the next product takes as its A operand.
//
// Dropout (drop_threshold > 0; Z = keep / (1 - p), the forward's mask): dV = (P o Z)^T dO,
// dP = (dO V^T) o Z, dS = P o (dP - delta) (delta = rowsum(dO o O) still). The dK/dV pass
// marks a dropped P^T entry by negating it (P >= 0, so the sign carries the mask and no
// extra register is live across the dV product): dV takes max(P^T, 0) and is scaled by
// 1 / (1 - p) at the end, dS^T takes |P^T|.
#include "attention_common.cuh"

namespace rk {

// One warp per query row.
template <class T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const AttnArgs p) {
  const int64_t row = int64_t(blockIdx.x) * 8 + warp_id();
  const int64_t total = int64_t(p.b) * p.h * p.nq;
  if (row >= total) return;  // whole warps leave together (row is warp-uniform)
  const int64_t bh = row / p.nq;
  const int64_t i = row % p.nq;
  const int64_t b = bh / p.h, h = bh % p.h;
  const T* o = reinterpret_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh + i * p.o_sm;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sm;
  float acc = 0.0f;
  for (int c = lane_id(); c < p.d; c += 32) acc += to_float(o[c]) * to_float(dout[c]);
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
  if (lane_id() == 0) reinterpret_cast<float*>(p.delta)[row] = acc;
}

// One block per key block of kBlockRows keys; sweeps the queries kBlockCols at a time.
template <class T, int kD>
__global__ void __launch_bounds__(BwdCfg<T, kD, true>::kThreads, 1)
    attn_bwd_dkdv_kernel(const AttnArgs p) {
  using Cfg = BwdCfg<T, kD, true>;
  constexpr int kR = Cfg::kBlockRows, kC = Cfg::kBlockCols, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kCT = kC / 8, kDT = Cfg::kAccD / 8;

  constexpr int kStages = Cfg::kStages;
  // K, V | Q[stage], dO[stage] | lse * log2(e)[stage], delta[stage] | fp32 staging
  T* sK = reinterpret_cast<T*>(smem_base());
  T* sV = sK + kR * kLd;
  T* sQ0 = sV + kR * kLd;
  T* sdO0 = sQ0 + kStages * kC * kLd;
  float* sLse0 = reinterpret_cast<float*>(sdO0 + kStages * kC * kLd);
  float* sDelta0 = sLse0 + kStages * kC;
  float* sStage = sDelta0 + kStages * kC;  // fp32 only

  const int num_n = (p.nk + kR - 1) / kR;
  const int n_block = static_cast<int>(blockIdx.x % num_n);
  const int64_t bh = blockIdx.x / num_n;
  const int64_t b = bh / p.h, h = bh % p.h;
  const int n0 = n_block * kR;
  const int warp = warp_id(), lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int tid = static_cast<int>(threadIdx.x);

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const float* lse = reinterpret_cast<const float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
  const float* delta = reinterpret_cast<const float*>(p.delta) + bh * p.nq;
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const int d = p.d;
  const float sl2 = p.scale * kLog2e;

  load_tile_async<T, kR, kD, kThreads>(sK, kLd, k, p.k_sm, n0, 0, p.nk - n0, d);
  load_tile_async<T, kR, kD, kThreads>(sV, kLd, v, p.v_sm, n0, 0, p.nk - n0, d);
  cp_async_commit();

  // Queries before the first one that sees key n0 contribute nothing under the causal mask.
  int m_begin = 0;
  if (p.causal) m_begin = max(0, n0 - mv.shift) / kC * kC;
  // a block of padding keys only (all past the sequence's last real key): no query sees
  // them, dK = dV = 0 (no sweep; the zero accumulators are stored)
  if (n0 >= kpm_key_end(p, b)) m_begin = p.nq;
  const int key0 = n0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8

  // One sweep over the query blocks accumulating dV and/or dK (compile-time flags) for the
  // output columns [d0, d0 + kAccD).
  auto sweep = [&](auto do_dv, auto do_dk, auto& acc_dv, auto& acc_dk, int d0) {
    constexpr bool kDV = decltype(do_dv)::value;
    constexpr bool kDK = decltype(do_dk)::value;
    // Q, dO (cp.async) and lse, delta (plain loads) of the query block at m0 into buffer s.
    auto fetch = [&](int m0, int s) {
      load_tile_async<T, kC, kD, kThreads>(sQ0 + s * kC * kLd, kLd, q, p.q_sm, m0, 0, p.nq - m0, d);
      load_tile_async<T, kC, kD, kThreads>(sdO0 + s * kC * kLd, kLd, dout, p.do_sm, m0, 0,
                                           p.nq - m0, d);
      for (int i = tid; i < kC; i += kThreads) {
        const int r = m0 + i;
        // lse = +inf (empty rows, and padding) makes P exactly 0
        sLse0[s * kC + i] = r < p.nq ? lse[r * p.lse_sm] * kLog2e : INFINITY;
        sDelta0[s * kC + i] = r < p.nq ? delta[r] : 0.0f;
      }
    };
    if (kStages == 2 && m_begin < p.nq) {
      fetch(m_begin, 0);
      cp_async_commit();
    }
    for (int m0 = m_begin, it = 0; m0 < p.nq; m0 += kC, ++it) {
      const int cur = kStages == 2 ? (it & 1) : 0;
      if (kStages == 2) {
        // prefetch the next block into the other buffer (read last in the previous step,
        // which ended at a barrier), then wait for this one only (one group per step; the
        // last step commits an empty group so the count stays uniform)
        if (m0 + kC < p.nq) fetch(m0 + kC, cur ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        fetch(m0, 0);
        cp_async_commit();
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* sQ = sQ0 + cur * kC * kLd;
      const T* sdO = sdO0 + cur * kC * kLd;
      const float* sLse = sLse0 + cur * kC;
      const float* sDelta = sDelta0 + cur * kC;

      // S^T = K Q^T (rows: keys, cols: queries)
      float st[1][kCT][4];
      zero(st);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        if (kk * 16 < d)
          warp_mma_k16<T, 1, kCT, false, true>(st, sK + warp * 16 * kLd + kk * 16, kLd,
                                               sQ + kk * 16, kLd, kC);
      }
      const bool full = mv.all_allowed(m0, m0 + kC, n0 + kR);
#pragma unroll
      for (int ci = 0; ci < kCT; ++ci) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = ci * 8 + 2 * t + (e & 1);
          const bool ok = full || mv.allowed(m0 + qc, key0 + (e >> 1) * 8);
          // one rounding (fma): for large logits the two terms nearly cancel
          st[0][ci][e] = ok ? ex2_approx(fmaf(st[0][ci][e], sl2, -sLse[qc])) : 0.0f;  // P^T
        }
      }
      if (drop.on()) {  // dropped: -P^T (query m0 + qc, key key0 (+ 8))
#pragma unroll
        for (int ci = 0; ci < kCT; ++ci) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!drop.keep(m0 + ci * 8 + 2 * t + (e & 1), key0 + (e >> 1) * 8))
              st[0][ci][e] = -st[0][ci][e];
          }
        }
      }

      // acc (this warp's 16 keys x the columns [d0, d0 + kAccD)) += st (its 16 x kC tile of
      // P^T or dS^T; max(st, 0) with `pos`, the kept P^T under dropout) times X (kC queries
      // x D in shared memory): A straight from registers on the tensor-core path, else
      // staged through shared memory.
      auto acc_st_x = [&](auto& acc, const T* sX, bool pos) {
        if constexpr (Cfg::kTC) {
#pragma unroll
          for (int kk = 0; kk < kC / 16; ++kk) {
            uint32_t a[4];
            if (pos)
              acc_to_a_frag<T, true>(a, st[0][2 * kk], st[0][2 * kk + 1]);
            else
              acc_to_a_frag<T>(a, st[0][2 * kk], st[0][2 * kk + 1]);
            warp_mma_k16_regA<T, kDT>(acc[0], a, sX + kk * 16 * kLd + d0, kLd, d - d0);
          }
        } else {
          float* stage = sStage + warp * 16 * kLdS;
          if (pos)
            acc_to_smem<kCT, true>(stage, kLdS, st[0]);
          else
            acc_to_smem<kCT>(stage, kLdS, st[0]);
          syncwarp();
#pragma unroll
          for (int kk = 0; kk < kC / 16; ++kk)
            warp_mma_k16<T, 1, kDT, false, false>(acc, stage + kk * 16, kLdS,
                                                  sX + kk * 16 * kLd + d0, kLd, d - d0);
          syncwarp();
        }
      };
      if constexpr (kDV) acc_st_x(acc_dv, sdO, drop.on());  // dV += (P o keep)^T dO
      if constexpr (kDK) {
        // dP^T = V dO^T, dS^T = P^T o (dP^T - delta)
        float dpt[1][kCT][4];
        zero(dpt);
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          if (kk * 16 < d)
            warp_mma_k16<T, 1, kCT, false, true>(dpt, sV + warp * 16 * kLd + kk * 16, kLd,
                                                 sdO + kk * 16, kLd, kC);
        }
        if (drop.on()) {  // dS^T = |P^T| o ((kept ? dP^T / (1 - p) : 0) - delta)
#pragma unroll
          for (int ci = 0; ci < kCT; ++ci) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float pt = st[0][ci][e];
              const float dz = pt > 0.0f ? dpt[0][ci][e] * drop.scale : 0.0f;
              st[0][ci][e] = fabsf(pt) * (dz - sDelta[ci * 8 + 2 * t + (e & 1)]);
            }
          }
        } else {
#pragma unroll
          for (int ci = 0; ci < kCT; ++ci) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              st[0][ci][e] *= dpt[0][ci][e] - sDelta[ci * 8 + 2 * t + (e & 1)];
          }
        }
        acc_st_x(acc_dk, sQ, false);  // dK += dS^T Q (scaled at the end)
      }
      __syncthreads();  // every warp is done with this query block's tiles
    }
  };

  cp_async_wait<0>();  // K and V (also when the sweep is empty)
  __syncthreads();
  T* dk = reinterpret_cast<T*>(p.dk) + b * p.dk_sb + h * p.dk_sh;
  T* dv = reinterpret_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh;
  const bool dk_pair = (reinterpret_cast<uintptr_t>(dk) % (2 * sizeof(T)) == 0) && p.dk_sm % 2 == 0;
  const bool dv_pair = (reinterpret_cast<uintptr_t>(dv) % (2 * sizeof(T)) == 0) && p.dv_sm % 2 == 0;
  const float dv_scale = drop.on() ? drop.scale : 1.0f;
  for (int d0 = 0; d0 < d; d0 += Cfg::kAccD) {
    if constexpr (Cfg::kTwoPass) {
      float acc[1][kDT][4];
      zero(acc);
      sweep(std::true_type{}, std::false_type{}, acc, acc, d0);
      store_rows<T, kDT>(dv + d0, p.dv_sm, key0, p.nk, d - d0, acc, dv_scale, dv_scale, dv_pair);
      zero(acc);
      sweep(std::false_type{}, std::true_type{}, acc, acc, d0);
      store_rows<T, kDT>(dk + d0, p.dk_sm, key0, p.nk, d - d0, acc, p.scale, p.scale, dk_pair);
    } else {
      float acc_dv[1][kDT][4], acc_dk[1][kDT][4];
      zero(acc_dv);
      zero(acc_dk);
      sweep(std::true_type{}, std::true_type{}, acc_dv, acc_dk, d0);
      store_rows<T, kDT>(dv + d0, p.dv_sm, key0, p.nk, d - d0, acc_dv, dv_scale, dv_scale,
                         dv_pair);
      store_rows<T, kDT>(dk + d0, p.dk_sm, key0, p.nk, d - d0, acc_dk, p.scale, p.scale,
                         dk_pair);
    }
  }
}

// One block per query block of kBlockRows queries; sweeps the keys kBlockCols at a time.
template <class T, int kD>
__global__ void __launch_bounds__(BwdCfg<T, kD, false>::kThreads, 1)
    attn_bwd_dq_kernel(const AttnArgs p) {
  using Cfg = BwdCfg<T, kD, false>;
  constexpr int kR = Cfg::kBlockRows, kC = Cfg::kBlockCols, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kCT = kC / 8, kDT = Cfg::kAccD / 8;

  constexpr int kStages = Cfg::kStages;
  // Q, dO | K[stage], V[stage] | fp32 staging (lse, delta of the rows live in registers)
  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sdO = sQ + kR * kLd;
  T* sK0 = sdO + kR * kLd;
  T* sV0 = sK0 + kStages * kC * kLd;
  float* sStage = reinterpret_cast<float*>(sV0 + kStages * kC * kLd);

  const int num_m = (p.nq + kR - 1) / kR;
  int m_block = static_cast<int>(blockIdx.x % num_m);
  const int64_t bh = blockIdx.x / num_m;
  if (p.causal) m_block = num_m - 1 - m_block;
  const int64_t b = bh / p.h, h = bh % p.h;
  const int m0 = m_block * kR;
  const int warp = warp_id(), lane = lane_id(), g = lane >> 2, t = lane & 3;

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const float* lse = reinterpret_cast<const float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
  const float* delta = reinterpret_cast<const float*>(p.delta) + bh * p.nq;
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const int d = p.d;
  const float sl2 = p.scale * kLog2e;

  int n_end = kpm_key_end(p, b);  // keys from the last real one on: all padding
  if (p.causal) n_end = min(n_end, m0 + kR + mv.shift);
  n_end = max(n_end, 0);
  const int n_blocks = (n_end + kC - 1) / kC;

  load_tile_async<T, kR, kD, kThreads>(sQ, kLd, q, p.q_sm, m0, 0, p.nq - m0, d);
  load_tile_async<T, kR, kD, kThreads>(sdO, kLd, dout, p.do_sm, m0, 0, p.nq - m0, d);
  cp_async_commit();

  const int row0 = m0 + warp * 16 + g;
  float lse2[2], dlt[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 8 * i;
    lse2[i] = r < p.nq ? lse[r * p.lse_sm] * kLog2e : INFINITY;
    dlt[i] = r < p.nq ? delta[r] : 0.0f;
  }
  T* dq = reinterpret_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
  const bool pair_ok = (reinterpret_cast<uintptr_t>(dq) % (2 * sizeof(T)) == 0) && p.dq_sm % 2 == 0;

  // K and V of key block j into buffer s (one cp.async group per call site).
  auto fetch = [&](int j, int s) {
    const int n0 = j * kC;
    load_tile_async<T, kC, kD, kThreads>(sK0 + s * kC * kLd, kLd, k, p.k_sm, n0, 0, p.nk - n0, d);
    load_tile_async<T, kC, kD, kThreads>(sV0 + s * kC * kLd, kLd, v, p.v_sm, n0, 0, p.nk - n0, d);
  };

  // One sweep over the keys per kAccD output columns (a single one except fp32 D = 256).
  for (int d0 = 0; d0 < d; d0 += Cfg::kAccD) {
    if (kStages == 2 && n_blocks > 0) {
      fetch(0, 0);
      cp_async_commit();
    }
    float acc_dq[1][kDT][4];
    zero(acc_dq);

    for (int j = 0; j < n_blocks; ++j) {
      const int n0 = j * kC;
      const int cur = kStages == 2 ? (j & 1) : 0;
      if (kStages == 2) {
        // prefetch block j + 1 into the other buffer (free since the barrier ending step
        // j - 1), then wait for Q, dO and block j only
        if (j + 1 < n_blocks) fetch(j + 1, cur ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        fetch(j, 0);
        cp_async_commit();
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* sK = sK0 + cur * kC * kLd;
      const T* sV = sV0 + cur * kC * kLd;

      float s[1][kCT][4];
      zero(s);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        if (kk * 16 < d)
          warp_mma_k16<T, 1, kCT, false, true>(s, sQ + warp * 16 * kLd + kk * 16, kLd,
                                               sK + kk * 16, kLd, kC);
      }
      const bool full = mv.all_allowed(m0, m0 + kR, n0 + kC);
#pragma unroll
      for (int ni = 0; ni < kCT; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok =
              full || mv.allowed(row0 + (e >> 1) * 8, n0 + ni * 8 + 2 * t + (e & 1));
          s[0][ni][e] = ok ? ex2_approx(fmaf(s[0][ni][e], sl2, -lse2[e >> 1])) : 0.0f;  // P
        }
      }

      float dp[1][kCT][4];
      zero(dp);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        if (kk * 16 < d)
          warp_mma_k16<T, 1, kCT, false, true>(dp, sdO + warp * 16 * kLd + kk * 16, kLd,
                                               sV + kk * 16, kLd, kC);
      }
      if (drop.on()) {  // dP o Z
#pragma unroll
        for (int ni = 0; ni < kCT; ++ni) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool kept = drop.keep(row0 + (e >> 1) * 8, n0 + ni * 8 + 2 * t + (e & 1));
            dp[0][ni][e] = kept ? dp[0][ni][e] * drop.scale : 0.0f;
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < kCT; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][ni][e] *= dp[0][ni][e] - dlt[e >> 1];  // dS
      }
      if constexpr (Cfg::kTC) {
#pragma unroll
        for (int kk = 0; kk < kC / 16; ++kk) {
          uint32_t a[4];
          acc_to_a_frag<T>(a, s[0][2 * kk], s[0][2 * kk + 1]);
          warp_mma_k16_regA<T, kDT>(acc_dq[0], a, sK + kk * 16 * kLd + d0, kLd, d - d0);
        }
      } else {
        float* stage = sStage + warp * 16 * kLdS;
        acc_to_smem<kCT>(stage, kLdS, s[0]);
        syncwarp();
#pragma unroll
        for (int kk = 0; kk < kC / 16; ++kk)
          warp_mma_k16<T, 1, kDT, false, false>(acc_dq, stage + kk * 16, kLdS,
                                                sK + kk * 16 * kLd + d0, kLd, d - d0);
        syncwarp();
      }
      __syncthreads();  // every warp is done with buffer cur: it may be refilled
    }
    store_rows<T, kDT>(dq + d0, p.dq_sm, row0, p.nq, d - d0, acc_dq, p.scale, p.scale, pair_ok);
  }
  cp_async_wait<0>();  // (only reached with copies in flight when there was no key block)
}

template <class T, int kD>
static std::string launch_attn_bwd(const AttnArgs& a, uintptr_t stream) {
  using KV = BwdCfg<T, kD, true>;
  using Q = BwdCfg<T, kD, false>;
  const int64_t rows = int64_t(a.b) * a.h * a.nq;
  const int64_t delta_blocks = (rows + 7) / 8;
  const int64_t kv_blocks = int64_t((a.nk + KV::kBlockRows - 1) / KV::kBlockRows) * a.b * a.h;
  const int64_t q_blocks = int64_t((a.nq + Q::kBlockRows - 1) / Q::kBlockRows) * a.b * a.h;
  if (delta_blocks > 0x7fffffff || kv_blocks > 0x7fffffff || q_blocks > 0x7fffffff)
    return "attention_bwd: too many blocks (B * H * N too large)";
  std::string err = launch(attn_bwd_delta_kernel<T>, "attention_bwd (delta)",
                           dim3(static_cast<unsigned>(delta_blocks)), dim3(256), 0, stream, a);
  if (!err.empty()) return err;
  if (a.path != 1 && attention_bwd_choice(a) == "sm90") return attention_bwd_sm90(a, stream);
  err = launch(attn_bwd_dkdv_kernel<T, kD>, "attention_bwd (dK/dV)",
               dim3(static_cast<unsigned>(kv_blocks)), dim3(KV::kThreads), KV::kSmemBytes,
               stream, a);
  if (!err.empty()) return err;
  return launch(attn_bwd_dq_kernel<T, kD>, "attention_bwd (dQ)",
                dim3(static_cast<unsigned>(q_blocks)), dim3(Q::kThreads), Q::kSmemBytes, stream,
                a);
}

std::string attention_bwd(const AttnArgs& a, uintptr_t stream) {
  std::string err = check_attn_common(a);
  if (!err.empty()) return err;
  const int vec = a.dtype == kFloat32 ? 4 : 8;
  const Operand ops[] = {{"q", a.q, a.q_sb, a.q_sh, a.q_sm},
        {"k", a.k, a.k_sb, a.k_sh, a.k_sm},
        {"v", a.v, a.v_sb, a.v_sh, a.v_sm},
        {"dout", a.dout, a.do_sb, a.do_sh, a.do_sm}};
  for (const Operand& op : ops) {
    err = check_aligned(op, vec);
    if (!err.empty()) return "attention_bwd: " + err;
  }
  if (a.o == 0 || a.lse == 0 || a.delta == 0 || a.dq == 0 || a.dk == 0 || a.dv == 0)
    return "attention_bwd: null pointer among o, lse, delta, dq, dk, dv";
  if (a.path < 0 || a.path > 2) return "attention_bwd: path must be 0, 1 or 2, got " + std::to_string(a.path);
#ifndef RECON_EMULATE
  if (a.path == 2) {
    err = sm90_unavailable();
    if (!err.empty()) return "attention_bwd: path = 2 (sm_90a) cannot run here: " + err;
  }
#endif
  RK_DISPATCH_DTYPE(a.dtype, T, RK_DISPATCH_HEAD_DIM(a.d, kD, return launch_attn_bwd<T, kD>(a, stream);))
}

}  // namespace rk
