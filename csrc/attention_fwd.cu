// Attention forward: FlashAttention-2 style tiling with an online softmax.
//
// One block = kBlockM query rows of one (batch, head); each warp owns kRowsPerWarp of them
// (FwdCfg: 32 rows, two m16 tiles, for fp16/bf16 up to D = 128). Q's fragments are loaded
// into registers once (fp32, SIMT: read from shared memory). The key/value sequence is
// swept kBlockN keys at a time, K and V double-buffered: the copies of tile j+1 (cp.async,
// one group) are issued right after the one barrier of tile j and land while it computes.
// Each tile runs in steps of kSubN keys: the mask / dropout predicates as bits, S = Q K^T,
// running max / sum in the log2 domain (scale * log2(e) folded into the scores), O rescaled
// only when some row's shift moved (lazily, RECON_CUDA_ATTN_LAZY), then O += P V with P
// reused from registers as the A operand. A warp skips the steps its rows cannot see (past
// Nq, or causal past the diagonal of its last row); the block skips the tiles past its last
// row's diagonal.
//
// Saves lse (natural log, float32) for backward; rows with no allowed key get O = 0 and
// lse = +inf (exp(s - lse) = 0 there in backward: zero gradient, never NaN).
//
// Dropout (drop_threshold > 0): the running sum l takes every probability (lse is the
// undropped one), the P V product only the kept ones; 1 / (1 - p) joins the final 1 / l.
#include "attention_common.cuh"

namespace rk {

// K and V of key tile jt into buffer jt % 2 (one commit group). Rows past Nk are
// zero-filled (they get -inf scores, and zeros keep NaN out of P V).
template <class T, int kD, class Cfg>
RK_DEVICE void load_kv_tile(T* sK, T* sV, const AttnArgs& p, const T* k, const T* v, int jt) {
  constexpr int kN = Cfg::kBlockN, kStage = kN * Cfg::kLd;
  const int n0 = jt * kN, buf = jt & 1;
  load_tile_async<T, kN, kD, Cfg::kThreads>(sK + buf * kStage, Cfg::kLd, k, p.k_sm, n0, 0,
                                            p.nk - n0, p.d);
  load_tile_async<T, kN, kD, Cfg::kThreads>(sV + buf * kStage, Cfg::kLd, v, p.v_sm, n0, 0,
                                            p.nk - n0, p.d);
  cp_async_commit();
}

template <class T, int kD>
__global__ void __launch_bounds__(FwdCfg<T, kD>::kThreads, 1) attn_fwd_kernel(const AttnArgs p) {
  using Cfg = FwdCfg<T, kD>;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kThreads = Cfg::kThreads, kMT = Cfg::kMT, kRows = Cfg::kRowsPerWarp;
  constexpr int kSN = Cfg::kSubN;  // keys per softmax step (a divisor of kN)
  constexpr int kNT = kSN / 8, kDT = kD / 8, kKT = kD / 16;
  constexpr int kStage = kN * kLd;  // elements of one K (or V) buffer
  constexpr int kMaskWords = (kMT * kNT * 4 + 31) / 32;
  static_assert(Cfg::kStages == 2, "the pipeline below is written for two K/V buffers");

  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sK = sQ + kM * kLd;       // 2 buffers
  T* sV = sK + 2 * kStage;     // 2 buffers
  float* sStage = reinterpret_cast<float*>(sV + 2 * kStage);  // fp32 only

  const int num_m = (p.nq + kM - 1) / kM;
  int m_block = static_cast<int>(blockIdx.x % num_m);
  const int64_t bh = blockIdx.x / num_m;
  // causal: the heaviest query blocks (most keys) start first, for a better tail
  if (p.causal) m_block = num_m - 1 - m_block;
  const int64_t b = bh / p.h, h = bh % p.h;
  const int m0 = m_block * kM;
  const int warp = warp_id(), lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int r8 = lane & 7, mat = lane >> 3;

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const int d = p.d;

  // Keys past the causal diagonal of the block's last row are never visited.
  int n_end = kpm_key_end(p, b);  // keys from the last real one on: all padding
  if (p.causal) n_end = min(n_end, m0 + kM + mv.shift);
  n_end = max(n_end, 0);
  const int n_blocks = (n_end + kN - 1) / kN;

  // This warp's rows [wrow, wrow + kRows); a warp whose rows are all past Nq, or (causal)
  // whose last row sees no key of a tile, skips that tile's math (it would only add
  // masked entries) but keeps loading and meeting the barriers with the others.
  const int wrow = m0 + warp * kRows;
  const int wlast = min(wrow + kRows, p.nq) - 1;

  load_tile_async<T, kM, kD, kThreads>(sQ, kLd, q, p.q_sm, m0, 0, p.nq - m0, d);
  cp_async_commit();
  if (n_blocks > 0) load_kv_tile<T, kD, Cfg>(sK, sV, p, k, v, 0);

  // Q fragments (A operand, row-major) of this warp's rows, loaded once.
  uint32_t qf[Cfg::kQInRegs ? kMT : 1][Cfg::kQInRegs ? kKT : 1][4];
  if constexpr (Cfg::kQInRegs) {
    if (n_blocks > 0) cp_async_wait<1>();  // Q has landed (K_0, V_0 may still be in flight)
    else cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int kk = 0; kk < kKT; ++kk) {
        if (kk * 16 < d) {
          const int r = warp * kRows + mi * 16 + (mat & 1) * 8 + r8;
          ldsm_x4(qf[mi][kk], sQ + r * kLd + kk * 16 + (mat >> 1) * 8);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) qf[mi][kk][e] = 0u;
        }
      }
    }
  }

  const float sl2 = p.scale * kLog2e;
  const float lazy = p.lazy_log2;
  // Per row: the exponent shift m_run (the running max of the log2-domain scores, kept
  // lazily: see the softmax step; kNoShift before any allowed key) and the sum l_run
  // (per-lane partial sums, quad-reduced at the end).
  float m_run[kMT][2], l_run[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    m_run[mi][0] = m_run[mi][1] = kNoShift;
    l_run[mi][0] = l_run[mi][1] = 0.0f;
  }
  float acc_o[kMT][kDT][4];
  zero(acc_o);

  for (int j = 0; j < n_blocks; ++j) {
    cp_async_wait<0>();  // K_j, V_j have landed (issued one tile ago)
    // ... visible to every thread, and every warp is done with tile j - 1: its buffers
    // take tile j + 1, which loads while this one computes (one barrier per tile)
    __syncthreads();
    if (j + 1 < n_blocks) load_kv_tile<T, kD, Cfg>(sK, sV, p, k, v, j + 1);
#pragma unroll 1
    for (int sub = 0; sub < kN / kSN; ++sub) {
      const int n0 = j * kN + sub * kSN;
      const T* cK = sK + (j & 1) * kStage + sub * kSN * kLd;
      const T* cV = sV + (j & 1) * kStage + sub * kSN * kLd;
      if (wrow >= p.nq || (p.causal && n0 > wlast + mv.shift)) break;  // so are the next ones

      float s[kMT][kNT][4];
      uint32_t pf[Cfg::kTC ? kMT : 1][Cfg::kTC ? kSN / 16 : 1][4];  // P as A fragments
      {
        // The mask and dropout predicates of this lane's kMT x kNT x 4 entries, as bits
        // (bit (mi * kNT + ni) * 4 + e), evaluated before S is live: their index math and
        // loads then never compete with the S, O and Q registers.
        uint32_t allow[kMaskWords], keep[kMaskWords];
        const bool full = mv.all_allowed(wrow, wrow + kRows, n0 + kSN);
#pragma unroll
        for (int w = 0; w < kMaskWords; ++w) allow[w] = keep[w] = ~0u;
        if (!full) {
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
            for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int bit = (mi * kNT + ni) * 4 + e;
                if (!mv.allowed(wrow + mi * 16 + g + (e >> 1) * 8, n0 + ni * 8 + 2 * t + (e & 1)))
                  allow[bit >> 5] &= ~(1u << (bit & 31));
              }
            }
          }
        }
        if (drop.on()) {
          // hash index i * Nk + j, stepped from one base (fewer live registers than per-row
          // products)
          const uint32_t base = static_cast<uint32_t>(wrow + g) * drop.nk + (n0 + 2 * t);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const uint32_t rb = base + static_cast<uint32_t>(mi * 16 + half * 8) * drop.nk;
#pragma unroll
              for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                  const int bit = (mi * kNT + ni) * 4 + half * 2 + c;
                  if (!drop.keep_at(rb + ni * 8 + c)) keep[bit >> 5] &= ~(1u << (bit & 31));
                }
              }
            }
          }
        }
        zero(s);
        if constexpr (Cfg::kQInRegs) {
#pragma unroll
          for (int kk = 0; kk < kKT; ++kk) {
            if (kk * 16 >= d) continue;
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
              // K stored [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), ...
              uint32_t b4[4];
              ldsm_x4(b4, cK + (np * 16 + (mat >> 1) * 8 + r8) * kLd + kk * 16 + (mat & 1) * 8);
              const uint32_t b0[2] = {b4[0], b4[1]};
              const uint32_t b1[2] = {b4[2], b4[3]};
#pragma unroll
              for (int mi = 0; mi < kMT; ++mi) {
                mma16816<T>(s[mi][2 * np], qf[mi][kk], b0);
                mma16816<T>(s[mi][2 * np + 1], qf[mi][kk], b1);
              }
            }
          }
        } else {
#pragma unroll
          for (int kk = 0; kk < kKT; ++kk) {
            if (kk * 16 < d)
              warp_mma_k16<T, kMT, kNT, false, true>(s, sQ + warp * kRows * kLd + kk * 16, kLd,
                                                     cK + kk * 16, kLd, kSN);
          }
        }

        float alpha[kMT][2];    // O and l rescale factors of this step's rows
        float rescale = 0.0f;  // 1 when some alpha != 1 (this lane's rows)
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
          for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int bit = (mi * kNT + ni) * 4 + e;
              float x = s[mi][ni][e] * sl2;
              if (!((allow[bit >> 5] >> (bit & 31)) & 1u)) x = -INFINITY;
              s[mi][ni][e] = x;
              mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
          }
          // Lazy rescaling (FlashAttention-4's): a row's shift only moves when the row's
          // max outgrows it by more than `lazy` (p.lazy_log2, RECON_CUDA_ATTN_LAZY; 0:
          // whenever it grows), so p <= 2^lazy and alpha = 2^0 = 1 on the rows that keep
          // theirs (l and O share the shift: O / l and lse are those of the exact max). A
          // row with nothing allowed yet keeps kNoShift (p = 2^-inf = 0).
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            mx[i] = quad_max(mx[i]);
            const float m_new = mx[i] - m_run[mi][i] > lazy ? mx[i] : m_run[mi][i];
            alpha[mi][i] = ex2_approx(m_run[mi][i] - m_new);
            if (alpha[mi][i] != 1.0f) rescale = 1.0f;
            m_run[mi][i] = m_new;
            l_run[mi][i] *= alpha[mi][i];
          }
#pragma unroll
          for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float pe = ex2_approx(s[mi][ni][e] - m_run[mi][e >> 1]);
              s[mi][ni][e] = pe;
              l_run[mi][e >> 1] += pe;
            }
          }
          if (drop.on()) {
#pragma unroll
            for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int bit = (mi * kNT + ni) * 4 + e;
                if (!((keep[bit >> 5] >> (bit & 31)) & 1u)) s[mi][ni][e] = 0.0f;
              }
            }
          }
          if constexpr (Cfg::kTC) {
#pragma unroll
            for (int kk = 0; kk < kSN / 16; ++kk)
              acc_to_a_frag<T>(pf[mi][kk], s[mi][2 * kk], s[mi][2 * kk + 1]);
          }
        }
        // O *= alpha, skipped when every alpha of the warp is 1 (x * 1 = x: the result is
        // bit for bit the same), the common case once the running maxima settle: kMT x kDT
        // x 4 multiplies saved per step. The flag is made warp-uniform (three shuffles: the
        // lanes of a quad hold the same rows) so the branch never diverges.
        rescale = fmaxf(rescale, shfl_xor(rescale, 4));
        rescale = fmaxf(rescale, shfl_xor(rescale, 8));
        rescale = fmaxf(rescale, shfl_xor(rescale, 16));
        if (rescale != 0.0f) {
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
            for (int di = 0; di < kDT; ++di) {
#pragma unroll
              for (int e = 0; e < 4; ++e) acc_o[mi][di][e] *= alpha[mi][e >> 1];
            }
          }
        }
      }

      {
        if constexpr (Cfg::kTC) {
#pragma unroll
          for (int kk = 0; kk < kSN / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < kDT / 2; ++np) {
              if (np * 16 >= d) continue;
              // V stored [k][n]: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
              uint32_t b4[4];
              ldsm_x4_trans(b4,
                            cV + (kk * 16 + (mat & 1) * 8 + r8) * kLd + np * 16 + (mat >> 1) * 8);
              const uint32_t b0[2] = {b4[0], b4[1]};
              const uint32_t b1[2] = {b4[2], b4[3]};
#pragma unroll
              for (int mi = 0; mi < kMT; ++mi) {
                mma16816<T>(acc_o[mi][2 * np], pf[mi][kk], b0);
                mma16816<T>(acc_o[mi][2 * np + 1], pf[mi][kk], b1);
              }
            }
          }
        } else {
          float* stage = sStage + warp * 16 * kLdS;
          acc_to_smem<kNT>(stage, kLdS, s[0]);
          syncwarp();
#pragma unroll
          for (int kk = 0; kk < kSN / 16; ++kk)
            warp_mma_k16<T, 1, kDT, false, false>(acc_o, stage + kk * 16, kLdS, cV + kk * 16 * kLd,
                                                  kLd, d);
          syncwarp();  // the next tile's staging overwrites this one
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits

  T* o = reinterpret_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  float* lse_out = reinterpret_cast<float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
  const bool pair_ok = (reinterpret_cast<uintptr_t>(o) % (2 * sizeof(T)) == 0) && p.o_sm % 2 == 0;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = wrow + mi * 16 + g + i * 8;
      const float l = quad_sum(l_run[mi][i]);
      if (r >= p.nq) continue;
      // l == 0 exactly when no key was allowed (otherwise the max contributes 2^(max - m_run)
      // >= 1: a shift is always some earlier max of the row)
      float inv = l > 0.0f ? 1.0f / l : 0.0f;
      if (drop.on()) inv *= drop.scale;
      T* row = o + r * p.o_sm;
#pragma unroll
      for (int ni = 0; ni < kDT; ++ni) {
        if (ni * 8 >= d) continue;
        store2<T>(row, ni * 8 + 2 * t, d, acc_o[mi][ni][2 * i] * inv,
                  acc_o[mi][ni][2 * i + 1] * inv, pair_ok);
      }
      if (t == 0) lse_out[r * p.lse_sm] = l > 0.0f ? (m_run[mi][i] + log2f(l)) * kLn2 : INFINITY;
    }
  }
}

template <class T, int kD>
static std::string launch_attn_fwd(const AttnArgs& a, uintptr_t stream) {
  using Cfg = FwdCfg<T, kD>;
  const int64_t blocks = int64_t((a.nq + Cfg::kBlockM - 1) / Cfg::kBlockM) * a.b * a.h;
  if (blocks > 0x7fffffff) return "attention_fwd: too many blocks (B * H * Nq too large)";
  return launch(attn_fwd_kernel<T, kD>, "attention_fwd", dim3(static_cast<unsigned>(blocks)),
                dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, a);
}

#ifdef RECON_EMULATE
std::vector<std::pair<std::string, int64_t>> emu_launch_counts() {
  const auto& m = ::rk::emu::launch_counts();
  return {m.begin(), m.end()};
}
#endif



std::string attention_fwd(const AttnArgs& a, uintptr_t stream) {
  std::string err = check_attn_common(a);
  if (!err.empty()) return err;
  if (a.path < 0 || a.path > 2) return "attention_fwd: path must be 0, 1 or 2, got " + std::to_string(a.path);
  const int vec = a.dtype == kFloat32 ? 4 : 8;
  const Operand ops[] = {{"q", a.q, a.q_sb, a.q_sh, a.q_sm},
        {"k", a.k, a.k_sb, a.k_sh, a.k_sm},
        {"v", a.v, a.v_sb, a.v_sh, a.v_sm}};
  for (const Operand& op : ops) {
    err = check_aligned(op, vec);
    if (!err.empty()) return "attention_fwd: " + err;
  }
  if (a.o == 0 || a.lse == 0) return "attention_fwd: null output pointer (o or lse)";
  if (a.path == 2) {
#ifndef RECON_EMULATE
    err = sm90_unavailable();
    if (!err.empty()) return "attention_fwd: path = 2 (sm_90a) cannot run here: " + err;
#endif
  }
  if (a.path != 1 && attention_fwd_choice(a) == "sm90") return attention_fwd_sm90(a, stream);
  RK_DISPATCH_DTYPE(a.dtype, T, RK_DISPATCH_HEAD_DIM(a.d, kD, return launch_attn_fwd<T, kD>(a, stream);))
}

std::string attention_fwd_tiles(int dtype, int d, AttnFwdTiles* out) {
  RK_DISPATCH_DTYPE(dtype, T, RK_DISPATCH_HEAD_DIM(d, kD, {
    using Cfg = FwdCfg<T, kD>;
    *out = AttnFwdTiles{kD, Cfg::kBlockM, Cfg::kBlockN, Cfg::kSubN, Cfg::kWarps,
                        Cfg::kRowsPerWarp, Cfg::kStages, Cfg::kQInRegs ? 1 : 0,
                        static_cast<int64_t>(Cfg::kSmemBytes)};
    return "";
  }))
}

}  // namespace rk
