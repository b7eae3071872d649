// Attention forward for Hopper (sm_90a): wgmma + TMA + warp specialisation (FA3 design).
//
// One block = 128 query rows of one (batch, head) (64 at D = 256), 384 threads in three
// warpgroups (256 in two at D = 256):
//   * warpgroup 0, the producer (setmaxnreg.dec 24): one thread issues every TMA load: the
//     Q tile once, then K_j and V_j into a two-stage ring (kStages buffers each), K and V on
//     their own "full" mbarriers (expect_tx of the whole box: TMA zero-fills rows past Nk
//     and columns past D), waiting on the stage's "empty" mbarrier before reusing it;
//   * warpgroups 1 and 2, the consumers (setmaxnreg.inc 240), 64 query rows each (one
//     consumer at D = 256: its 128 O registers per thread leave no room under the 168 that
//     ptxas allots each thread of a 384-thread block, 28 bytes spilled): S = Q K^T
//     by wgmma from shared memory (SS: Q and K K-major, 128-byte swizzle, one m64nBNk16 per
//     16 columns of D), online softmax in registers, O += P V by wgmma with P from
//     registers (RS: the S accumulator converted in place to the A fragment) and V MN-major
//     (imm-trans-b: V's row-major [key][d] tile as TMA wrote it).
// Intra-warpgroup overlap (FA3's): iteration j issues S_j = Q K_j^T and then O += P_{j-1}
// V_{j-1} as two commit groups, waits for the first only (wgmma.wait_group 1: the P V
// product runs on the tensor cores during the softmax of S_j), then waits for the second
// before rescaling O. So at most one softmax and two GEMMs are in flight per warpgroup.
//
// Same semantics as attention_fwd.cu (the sm_80 kernel): masks (boolean, key padding),
// causal aligned bottom-right, counter-based dropout (DropoutView), lse in natural log,
// fully masked rows O = 0 and lse = +inf. D is padded to the bucket kD in {64, 128, 256}
// by the TMA zero fill (dims[0] = D); Nq / Nk tails likewise.
//
// Shared memory (1024-byte aligned, every tile in 64-column chunks of 128-byte rows, the
// 128B swizzle atom of TMA and wgmma): Q 128 x kD, K and V kStages x kBlockN x kD each,
// then the mbarriers. kD = 128: 32 + 128 KiB; kD = 256 (64 rows, kBlockN 64): 32 + 128 KiB.
#include "attention_sm90.cuh"

namespace rk {

template <class T, int kD>
struct FwdSm90Cfg {
  static constexpr int kConsumers = kD <= 128 ? 2 : 1;  // consumer warpgroups, 64 rows each
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = kD <= 128 ? 128 : 64;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kChunks = kD / 64;  // 64-column (128-byte) chunks of a row
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kKVBytes = kBlockN * kD * 2;  // one K (or V) stage
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 1 ? 256 : 240;
  static constexpr size_t kSmemBytes =
      1024 /* alignment slack */ + size_t(kQBytes) + size_t(2 * kStages) * kKVBytes + 1024;
};

struct FwdSm90Params {
  TmaDesc tq, tk, tv;  // 4D (D, N, H, B) maps, box (64, rows, 1, 1), 128-byte swizzle
  AttnArgs a;
};

// kMask: a boolean mask, key padding or causal (per-element tests on the tiles that need
// them); otherwise only the keys past Nk of the last tile are masked. kDrop: dropout. Both
// compile-time so the steady loop of the plain kernel carries no predicate code.
template <class T, int kD, bool kMask, bool kDrop>
__global__ void __launch_bounds__(FwdSm90Cfg<T, kD>::kThreads, 1) attn_fwd_sm90_kernel(const __grid_constant__ FwdSm90Params prm) {
#if RK_SM90_DEVICE || defined(RECON_EMULATE)
  using Cfg = FwdSm90Cfg<T, kD>;
  constexpr int kN = Cfg::kBlockN, kS = Cfg::kStages, kChunks = Cfg::kChunks;
  constexpr int kNB = kN / 8;   // n8 blocks of an S row fragment
  constexpr int kDB = kD / 8;   // n8 blocks of an O row fragment
  constexpr int kQChunk = Cfg::kBlockM * 128, kKVChunk = kN * 128;  // bytes per 64-col chunk
  const AttnArgs& p = prm.a;

  unsigned char* base = smem_base();
#ifndef RECON_EMULATE  // (the emulator's shared memory is 1024-byte aligned)
  base += (1024 - (smem_u32(base) & 1023)) & 1023;
#endif
  unsigned char* sQ = base;
  unsigned char* sK = sQ + Cfg::kQBytes;                // kS stages
  unsigned char* sV = sK + kS * Cfg::kKVBytes;          // kS stages
  uint64_t* bars = reinterpret_cast<uint64_t*>(sV + kS * Cfg::kKVBytes);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;           // [kS]
  uint64_t* v_full = bars + 1 + kS;      // [kS]
  uint64_t* kv_empty = bars + 1 + 2 * kS;  // [kS]

  const int num_m = (p.nq + Cfg::kBlockM - 1) / Cfg::kBlockM;
  int m_block = static_cast<int>(blockIdx.x % num_m);
  const int64_t bh = blockIdx.x / num_m;
  if (p.causal) m_block = num_m - 1 - m_block;  // heaviest blocks first
  const int b = static_cast<int>(bh / p.h), h = static_cast<int>(bh % p.h);
  const int m0 = m_block * Cfg::kBlockM;
  const int shift = p.nk - p.nq;
  int n_end = kpm_key_end(p, b);  // producer and consumers: the same key blocks
  if (p.causal) n_end = min(n_end, m0 + Cfg::kBlockM + shift);
  n_end = max(n_end, 0);
  const int n_blocks = (n_end + kN - 1) / kN;

  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kS; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&kv_empty[s], 128 * Cfg::kConsumers);  // every consumer thread arrives
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (tid < 128) {  // ---------------------------------------------------- producer
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0) {
      mbar_arrive_expect_tx(q_full, Cfg::kQBytes);
      for (int c = 0; c < kChunks; ++c) tma_load_4d(sQ + c * kQChunk, &prm.tq, q_full, 64 * c, m0, h, b);
      for (int j = 0; j < n_blocks; ++j) {
        const int s = j % kS;
        if (j >= kS) mbar_wait(&kv_empty[s], ((j / kS) + 1) & 1);  // consumers released it
        mbar_arrive_expect_tx(&k_full[s], Cfg::kKVBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load_4d(sK + s * Cfg::kKVBytes + c * kKVChunk, &prm.tk, &k_full[s], 64 * c, j * kN, h, b);
        mbar_arrive_expect_tx(&v_full[s], Cfg::kKVBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load_4d(sV + s * Cfg::kKVBytes + c * kKVChunk, &prm.tv, &v_full[s], 64 * c, j * kN, h, b);
      }
    }
    return;
  }

  // ------------------------------------------------------------------------ consumers
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  // consumer index: rows 64 wg .. 64 wg + 63 of the block (warp-uniform to ptxas: the
  // descriptors computed from it stay in uniform registers)
  const int wg = warp_uniform(tid / 128 - 1);
  const int wt = tid % 128, warp = wt / 32, lane = wt % 32, g = lane / 4, t4 = lane % 4;
  const int row0 = m0 + 64 * wg;             // first row of this warpgroup
  const int r_lo = row0 + 16 * warp + g;     // this thread's rows r_lo, r_lo + 8
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const float sl2 = p.scale * kLog2e;
  const float lazy = p.lazy_log2;
  const int d = p.d;

  // Descriptors, encoded once: a k16 step or stage only adds its byte offset / 16 to the
  // start-address field (compile-time constants but the stage; the fields never carry:
  // shared addresses < 256 KiB). Q (A): chunk kk / 4 of rows 64 wg.., k16 step kk at byte
  // (kk % 4) * 32 of the 128-byte row; K (B, K-major) likewise; V (B, MN-major): keys
  // 16 kk.. of the stage, the D chunks LBO = kKVChunk apart, 8-key groups SBO = 1024 apart.
  const uint64_t q_desc0 = make_desc(sQ + wg * 64 * 128, 16, 1024, 128);
  const uint64_t k_desc0 = make_desc(sK, 16, 1024, 128);
  const uint64_t v_desc0 = make_desc(sV, kKVChunk, 1024, 128);
  auto q_desc = [&](int kk) { return q_desc0 + uint64_t(((kk / 4) * kQChunk + (kk % 4) * 32) >> 4); };
  // a stage's base descriptor once per tile, then each k16 step adds an immediate
  auto stage_desc = [&](uint64_t d0, int s) { return d0 + uint64_t(uint32_t(s) * (Cfg::kKVBytes >> 4)); };
  auto k_desc = [&](uint64_t kb, int kk) { return kb + uint64_t(((kk / 4) * kKVChunk + (kk % 4) * 32) >> 4); };
  auto v_desc = [&](uint64_t vb, int kk) { return vb + uint64_t((kk * 16 * 128) >> 4); };

  float acc_o[kDB][4];
  zero(reinterpret_cast<float(&)[1][kDB][4]>(acc_o));
  float sacc[kNB][4];
  uint32_t pf[kN / 16][4];  // P as the A fragments of the P V product
  // per row: the exponent shift m (the running max of s sl2, kept lazily; kNoShift before
  // any allowed key) and the sum l
  float m_sh[2] = {kNoShift, kNoShift}, l_run[2] = {0.0f, 0.0f};

  // S_j = Q K_j^T into sacc (one commit group; every k16 step of the bucket: TMA zero-fills
  // the columns past D, and a uniform loop keeps the HGMMAs back to back)
  auto issue_s = [&](int j) {
    const uint64_t kb = stage_desc(k_desc0, j % kS);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      wgmma_ss<T, kN>(reinterpret_cast<float(&)[kN / 2]>(sacc), q_desc(kk), k_desc(kb, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int j) {
    const uint64_t vb = stage_desc(v_desc0, j % kS);
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
      wgmma_rs<T, kD, true>(reinterpret_cast<float(&)[kD / 2]>(acc_o), pf[kk], v_desc(vb, kk), 1);
    wgmma_commit();
  };
  // Masks, scale, running max / sum, P (fp32, in sacc) and the O rescale factors.
  // kTail (compile time): the tile may hold keys past Nk (the last one), the only tile whose
  // plain-kernel code tests them, so the steady loop has no predicate code at all.
  auto softmax = [&](int j, float (&alpha)[2], auto tail_tag) {
    constexpr bool kTail = decltype(tail_tag)::value;
    const int n0 = j * kN;
    if (kMask ? !mv.all_allowed(row0, row0 + 64, n0 + kN) : (kTail && n0 + kN > p.nk)) {
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + 8 * nb + 2 * t4 + (e & 1);
          const bool ok = kMask ? mv.allowed(r_lo + 8 * (e >> 1), col) : col < p.nk;
          if (!ok) sacc[nb][e] = -INFINITY;
        }
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], sacc[nb][e]);
    }
    mx[0] = quad_max(mx[0]) * sl2;
    mx[1] = quad_max(mx[1]) * sl2;
    // p = 2^(s sl2 - m) is one FFMA and one MUFU.EX2 per element: the maxima are taken on
    // the raw scores (scale > 0: the launcher sends other scales to the portable kernel).
    // Lazy rescaling (FlashAttention-4's): a row's shift m only moves when the row's max
    // outgrows it by more than `lazy` (p.lazy_log2, RECON_CUDA_ATTN_LAZY; 0: whenever it
    // grows), so p <= 2^lazy (fp32 sums, P in bf16/fp16 at the same relative precision)
    // and alpha = 2^0 = 1 on the rows that keep theirs; l and O share the shift, so O / l
    // and lse are those of the exact max. m starts at kNoShift: the first allowed key moves
    // it (alpha = 0 on the empty O and l); a row with nothing allowed yet keeps it
    // (p = 2^-inf = 0). Branch-free: a flag carried to rescale_o costs a register the
    // masked dropout kernels do not have (168 per thread).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = mx[i] - m_sh[i] > lazy ? mx[i] : m_sh[i];
      alpha[i] = ex2_approx(m_sh[i] - m_new);
      m_sh[i] = m_new;
      l_run[i] *= alpha[i];
    }
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = ex2_approx(fmaf(sacc[nb][e], sl2, -m_sh[e >> 1]));
        sacc[nb][e] = pe;
        l_run[e >> 1] += pe;
      }
    }
    if constexpr (kDrop) {
      const uint32_t rb0 = static_cast<uint32_t>(r_lo) * drop.nk + static_cast<uint32_t>(n0 + 2 * t4);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t rb = rb0 + static_cast<uint32_t>(8 * half) * drop.nk;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int c = 0; c < 2; ++c)
            if (!drop.keep_at(rb + 8 * nb + c)) sacc[nb][2 * half + c] = 0.0f;
        }
      }
    }
  };
  // O *= alpha, skipped by a thread whose two rows kept their shifts (a warp skips it when
  // all of its rows did: once the maxima settle, nearly always)
  auto rescale_o = [&](const float (&alpha)[2]) {
    if (alpha[0] != 1.0f || alpha[1] != 1.0f) {
#pragma unroll
      for (int db = 0; db < kDB; ++db) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[db][e] *= alpha[e >> 1];
      }
    }
  };
  auto to_pf = [&]() {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) acc_to_a_frag<T>(pf[kk], sacc[2 * kk], sacc[2 * kk + 1]);
  };

  // Pingpong (p.pingpong, two consumers): the warpgroups take turns issuing their GEMMs, so
  // one's softmax runs under the other's GEMMs (FlashAttention-3). Named barrier 1 + w says
  // "warpgroup w may issue": w waits on it (bar.sync, 256 = both groups) and hands the turn
  // on by arriving at the other's. Each group has n_blocks + 1 issue phases (S_0; S_j with
  // P_{j-1} V_{j-1}; the last P V); group 1 opens group 0's first turn and skips its last
  // hand-over, so every barrier sees as many arrivals as waits and none is left open.
  // The steady loop is compiled twice, with and without the turns (the default schedule
  // keeps its instruction count); the first and last phases test pp at run time.
  const bool pp = Cfg::kConsumers == 2 && p.pingpong && n_blocks > 0;
  using Never = std::integral_constant<int, 0>;
  using Always = std::integral_constant<int, 1>;
  using AtRunTime = std::integral_constant<int, 2>;
  auto turn_wait = [&](auto mode) {
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode == 1) named_bar_sync(1 + wg, 2 * 128);
    if constexpr (kMode == 2) {
      if (pp) named_bar_sync(1 + wg, 2 * 128);
    }
  };
  auto turn_pass = [&](auto mode, bool last) {
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode != 0) {
      if ((kMode == 1 || pp) && !(last && wg == 1)) named_bar_arrive(2 - wg, 2 * 128);
    }
  };
  if (pp && wg == 1) named_bar_arrive(1, 2 * 128);  // warpgroup 0 goes first

  mbar_wait(q_full, 0);
  if (n_blocks > 0) {
    float alpha[2];
    mbar_wait(&k_full[0], 0);
    turn_wait(AtRunTime{});
    wgmma_fence();
    issue_s(0);
    turn_pass(AtRunTime{}, false);
    wgmma_wait<0>();
    softmax(0, alpha, std::true_type{});
    to_pf();
    auto step = [&](int j, auto tail_tag, auto pp_mode) {
      const int s = j % kS, sp = (j - 1) % kS;
      mbar_wait(&k_full[s], (j / kS) & 1);
      turn_wait(pp_mode);
      wgmma_fence();
      issue_s(j);
      mbar_wait(&v_full[sp], ((j - 1) / kS) & 1);
      issue_pv(j - 1);
      turn_pass(pp_mode, false);
      wgmma_wait<1>();  // S_j has landed; P_{j-1} V_{j-1} still runs
      softmax(j, alpha, tail_tag);
      wgmma_wait<0>();  // O += P_{j-1} V_{j-1} done: its stage's K and V are free
      mbar_arrive(&kv_empty[sp]);
      rescale_o(alpha);
      to_pf();
    };
    if (pp) {
      for (int j = 1; j < n_blocks - 1; ++j) step(j, std::false_type{}, Always{});
    } else {
      for (int j = 1; j < n_blocks - 1; ++j) step(j, std::false_type{}, Never{});
    }
    if (n_blocks > 1) step(n_blocks - 1, std::true_type{}, AtRunTime{});
    const int sl = (n_blocks - 1) % kS;
    mbar_wait(&v_full[sl], ((n_blocks - 1) / kS) & 1);
    turn_wait(AtRunTime{});
    wgmma_fence();
    issue_pv(n_blocks - 1);
    turn_pass(AtRunTime{}, true);
    wgmma_wait<0>();
    mbar_arrive(&kv_empty[sl]);
  }

  T* o = reinterpret_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  float* lse_out = reinterpret_cast<float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
  const bool pair_ok = (reinterpret_cast<uintptr_t>(o) % (2 * sizeof(T)) == 0) && p.o_sm % 2 == 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_lo + 8 * i;
    const float l = quad_sum(l_run[i]);
    if (r >= p.nq) continue;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;  // l == 0 exactly when no key was allowed
    if (kDrop) inv *= drop.scale;
    T* row = o + r * p.o_sm;
#pragma unroll
    for (int db = 0; db < kDB; ++db) {
      if (db * 8 >= d) continue;
      store2<T>(row, db * 8 + 2 * t4, d, acc_o[db][2 * i] * inv, acc_o[db][2 * i + 1] * inv, pair_ok);
    }
    if (t4 == 0) lse_out[r * p.lse_sm] = l > 0.0f ? (m_sh[i] + log2f(l)) * kLn2 : INFINITY;
  }
#endif
}

// "" when the sm_90a kernel can run these arguments (fp16/bf16; q/k/v strides TMA can
// describe: positive multiples of 16 bytes), else why not.
std::string attention_fwd_sm90_why_not(const AttnArgs& a) {
  if (a.dtype != kFloat16 && a.dtype != kBFloat16) return "dtype is not float16/bfloat16";
  if (!(a.scale > 0.0f)) return "scale <= 0 (the sm_90a softmax takes maxima of raw scores)";
  const int64_t n[3] = {a.nq, a.nk, a.nk};
  const int64_t st[3][3] = {{a.q_sm, a.q_sh, a.q_sb}, {a.k_sm, a.k_sh, a.k_sb}, {a.v_sm, a.v_sh, a.v_sb}};
  for (int i = 0; i < 3; ++i)
    if (!tma_describable(a, n[i], st[i][0], st[i][1], st[i][2]))
      return "a q/k/v stride is not a positive multiple of 16 bytes (TMA)";
  return "";
}

std::string attention_fwd_choice(const AttnArgs& a) {
  return sm90_choice(a, attention_fwd_sm90_why_not(a), "kernel");
}

template <class T, int kD, bool kMask, bool kDrop>
static std::string launch_attn_fwd_sm90(const AttnArgs& a, uintptr_t stream) {
  using Cfg = FwdSm90Cfg<T, kD>;
  FwdSm90Params prm{};
  prm.a = a;
  const TmaOperand ops[] = {{&prm.tq, a.q, a.nq, a.q_sm, a.q_sh, a.q_sb, Cfg::kBlockM, "q"},
             {&prm.tk, a.k, a.nk, a.k_sm, a.k_sh, a.k_sb, Cfg::kBlockN, "k"},
             {&prm.tv, a.v, a.nk, a.v_sm, a.v_sh, a.v_sb, Cfg::kBlockN, "v"}};
  std::string tma_err = make_attn_tmas("attention_fwd (sm90)", a, ops);
  if (!tma_err.empty()) return tma_err;
  const int64_t blocks = int64_t((a.nq + Cfg::kBlockM - 1) / Cfg::kBlockM) * a.b * a.h;
  if (blocks > 0x7fffffff) return "attention_fwd: too many blocks (B * H * Nq too large)";
#ifdef RECON_EMULATE
  ::rk::emu::SmemLimitSm90 sm90_limit;
#endif
  return launch(attn_fwd_sm90_kernel<T, kD, kMask, kDrop>, "attention_fwd_sm90", dim3(static_cast<unsigned>(blocks)),
                dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, prm);
}

std::string attention_fwd_sm90(const AttnArgs& a, uintptr_t stream) {
  std::string err = attention_fwd_sm90_why_not(a);
  if (!err.empty()) return "attention_fwd (sm90): " + err;
  return dispatch_sm90(a, [&](auto t, auto kd, auto mask, auto drop) {
    return launch_attn_fwd_sm90<typename decltype(t)::type, decltype(kd)::value, decltype(mask)::value,
                                decltype(drop)::value>(a, stream);
  });
}

}  // namespace rk
