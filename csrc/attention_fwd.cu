// Attention forward: FlashAttention-2 style tiling with an online softmax.
//
// One block = kBlockM query rows of one (batch, head); each warp owns 16 rows. The key/value
// sequence is swept kBlockN keys at a time: S = Q K^T (tensor cores, or SIMT for fp32),
// masks, running max / sum in the log2 domain (scale * log2(e) folded into the scores),
// then O += P V with P reused from registers as the A operand. K_{j+1} is fetched while
// P V_j runs and V_{j+1} while S_{j+1} runs (cp.async).
//
// Saves lse (natural log, float32) for backward; rows with no allowed key get O = 0 and
// lse = +inf (exp(s - lse) = 0 there in backward: zero gradient, never NaN).
//
// Dropout (drop_threshold > 0): the running sum l takes every probability (lse is the
// undropped one), the P V product only the kept ones; 1 / (1 - p) joins the final 1 / l.
#include "attention_common.cuh"

namespace rk {

template <class T, int kD>
__global__ void __launch_bounds__(FwdCfg<T, kD>::kThreads, 1) attn_fwd_kernel(const AttnArgs p) {
  using Cfg = FwdCfg<T, kD>;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kLd = Cfg::kLd, kLdS = Cfg::kLdS;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kNT = kN / 8, kDT = kD / 8;

  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sK = sQ + kM * kLd;
  T* sV = sK + kN * kLd;
  float* sStage = reinterpret_cast<float*>(sV + kN * kLd);  // fp32 only

  const int num_m = (p.nq + kM - 1) / kM;
  int m_block = static_cast<int>(blockIdx.x % num_m);
  const int64_t bh = blockIdx.x / num_m;
  // causal: the heaviest query blocks (most keys) start first, for a better tail
  if (p.causal) m_block = num_m - 1 - m_block;
  const int64_t b = bh / p.h, h = bh % p.h;
  const int m0 = m_block * kM;
  const int warp = warp_id(), lane = lane_id(), g = lane >> 2, t = lane & 3;

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const int d = p.d;

  // Keys past the causal diagonal of the block's last row are never visited.
  int n_end = p.nk;
  if (p.causal) n_end = min(p.nk, m0 + kM + mv.shift);
  n_end = max(n_end, 0);
  const int n_blocks = (n_end + kN - 1) / kN;

  load_tile_async<T, kM, kD, kThreads>(sQ, kLd, q, p.q_sm, m0, 0, p.nq - m0, d);
  cp_async_commit();
  if (n_blocks > 0) {
    load_tile_async<T, kN, kD, kThreads>(sK, kLd, k, p.k_sm, 0, 0, p.nk, d);
    cp_async_commit();
    load_tile_async<T, kN, kD, kThreads>(sV, kLd, v, p.v_sm, 0, 0, p.nk, d);
    cp_async_commit();
  }

  const float sl2 = p.scale * kLog2e;
  const int row0 = m0 + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};  // per-lane partial sums; quad-reduced at the end
  float acc_o[1][kDT][4];
  zero(acc_o);

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kN;
    cp_async_wait<1>();  // Q and K_j have landed (V_j may still be in flight)
    __syncthreads();

    float s[1][kNT][4];
    zero(s);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk * 16 < d)
        warp_mma_k16<T, 1, kNT, false, true>(s, sQ + warp * 16 * kLd + kk * 16, kLd,
                                             sK + kk * 16, kLd, kN);
    }

    const bool full = mv.all_allowed(m0, m0 + kM, n0 + kN);
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[0][ni][e] * sl2;
        if (!full && !mv.allowed(row0 + (e >> 1) * 8, n0 + ni * 8 + 2 * t + (e & 1)))
          x = -INFINITY;
        s[0][ni][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_safe[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = quad_max(mx[i]);
      // A row with nothing allowed so far keeps max -inf: shift by 0 (exp2(-inf) = 0).
      m_safe[i] = mx[i] == -INFINITY ? 0.0f : mx[i];
      const float alpha = exp2f(m_run[i] - m_safe[i]);
      m_run[i] = mx[i];
      l_run[i] *= alpha;
#pragma unroll
      for (int di = 0; di < kDT; ++di) {
        acc_o[0][di][2 * i] *= alpha;
        acc_o[0][di][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[0][ni][e] - m_safe[e >> 1]);
        s[0][ni][e] = pe;
        l_run[e >> 1] += pe;
      }
    }
    if (drop.on()) {
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!drop.keep(row0 + (e >> 1) * 8, n0 + ni * 8 + 2 * t + (e & 1))) s[0][ni][e] = 0.0f;
        }
      }
    }

    cp_async_wait<0>();  // V_j has landed
    __syncthreads();     // ... and every warp is done with K_j: refill it
    if (j + 1 < n_blocks)
      load_tile_async<T, kN, kD, kThreads>(sK, kLd, k, p.k_sm, n0 + kN, 0, p.nk - n0 - kN, d);
    cp_async_commit();

    if constexpr (Cfg::kTC) {
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        uint32_t a[4];
        acc_to_a_frag<T>(a, s[0][2 * kk], s[0][2 * kk + 1]);
        warp_mma_k16_regA<T, kDT>(acc_o[0], a, sV + kk * 16 * kLd, kLd, d);
      }
    } else {
      float* stage = sStage + warp * 16 * kLdS;
      acc_to_smem<kNT>(stage, kLdS, s[0]);
      syncwarp();
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk)
        warp_mma_k16<T, 1, kDT, false, false>(acc_o, stage + kk * 16, kLdS, sV + kk * 16 * kLd,
                                              kLd, d);
      syncwarp();  // the next tile's staging overwrites this one
    }
    __syncthreads();  // every warp is done with V_j: refill it
    if (j + 1 < n_blocks)
      load_tile_async<T, kN, kD, kThreads>(sV, kLd, v, p.v_sm, n0 + kN, 0, p.nk - n0 - kN, d);
    cp_async_commit();
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits

  float inv[2], lse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(l_run[i]);
    // l == 0 exactly when no key was allowed (otherwise the max contributes 2^0 = 1)
    inv[i] = l > 0.0f ? 1.0f / l : 0.0f;
    if (drop.on()) inv[i] *= drop.scale;
    lse[i] = l > 0.0f ? (m_run[i] + log2f(l)) * kLn2 : INFINITY;
  }
  T* o = reinterpret_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  const bool pair_ok = (reinterpret_cast<uintptr_t>(o) % (2 * sizeof(T)) == 0) && p.o_sm % 2 == 0;
  store_rows<T, kDT>(o, p.o_sm, row0, p.nq, d, acc_o, inv[0], inv[1], pair_ok);
  if (t == 0) {
    float* lse_out = reinterpret_cast<float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
    if (row0 < p.nq) lse_out[row0 * p.lse_sm] = lse[0];
    if (row0 + 8 < p.nq) lse_out[(row0 + 8) * p.lse_sm] = lse[1];
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

std::string attention_fwd(const AttnArgs& a, uintptr_t stream) {
  std::string err = check_attn_common(a);
  if (!err.empty()) return err;
  const int vec = a.dtype == kFloat32 ? 4 : 8;
  const Operand ops[] = {{"q", a.q, a.q_sb, a.q_sh, a.q_sm},
        {"k", a.k, a.k_sb, a.k_sh, a.k_sm},
        {"v", a.v, a.v_sb, a.v_sh, a.v_sm}};
  for (const Operand& op : ops) {
    err = check_aligned(op, vec);
    if (!err.empty()) return "attention_fwd: " + err;
  }
  if (a.o == 0 || a.lse == 0) return "attention_fwd: null output pointer (o or lse)";
  RK_DISPATCH_DTYPE(a.dtype, T, RK_DISPATCH_HEAD_DIM(a.d, kD, return launch_attn_fwd<T, kD>(a, stream);))
}

}  // namespace rk
