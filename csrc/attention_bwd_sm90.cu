// Attention backward for Hopper (sm_90a): wgmma + TMA + warp specialisation, atomic dQ
// (the FA3 scheme: 5 GEMMs per tile, one pass over the queries per key block).
//
// One block = 128 keys of one (batch, head) at D <= 64 (64 at D = 128), 384 threads (256):
// warpgroup 0 the producer (setmaxnreg.dec 40; warp 0: one thread issues the TMA loads, K
// and V once, then Q_j and dO_j, 64 queries each, into a two-stage ring with full / empty
// mbarriers, and the warp stages lse / delta; warp 1: the dQ writer, dq_writer below),
// warpgroups 1 and 2 the consumers (setmaxnreg.inc 232; 256 with one consumer), 64 keys
// each. Per query tile, in each consumer (rows
// = its keys, so P^T and dS^T come out of the accumulators in the A-operand layout):
//   S^T = K Q^T and dP^T = V dO^T        (wgmma SS, K-major operands; two commit groups:
//                                          the exponentials of P^T run under dP^T)
//   P^T = exp2(S^T scale log2 e - lse log2 e) (0 where masked; lse = +inf past Nq),
//   dS^T = P^T o (dP^T o Z - delta)      (Z: the dropout keep mask / (1 - p))
//   dV += (P^T o Z) dO, dK += dS^T Q     (wgmma RS: A from registers, dO / Q MN-major)
//   dQ += dS K                           (dS^T stored transposed to shared memory as the
//                                          K-major A operand, K MN-major; 64-column chunks
//                                          of dQ, each staged in shared memory and handed
//                                          to the writer warp (named barriers), which adds
//                                          it to dq_accum by one bulk reduction,
//                                          cp.reduce.async.bulk .add.f32, 16 KiB)
// then dK = scale dK, dV, stored from registers; attn_bwd_dq_convert_sm90_kernel writes
// dq = scale dq_accum in the input dtype. dq_accum is tile-ordered (DqTile): the staging
// layout is the accumulator fragment's, so the stores to it are conflict-free 16-byte ones
// and each reduction is one contiguous block. Keys past Nk and columns past D are TMA zero
// fill: their dS^T rows meet zero K rows in dQ, and their dK / dV rows are never stored,
// so the plain kernel needs no per-element test at all; masks / causal / key padding /
// dropout are compile-time variants as in the forward. At D = 256 dK and dV alone would be
// 256 registers per thread: two launches (kPass), dV first, then dK and dQ.
// a.deterministic orders the reductions into each dQ tile (key block, then consumer: the
// counters after the DqTiles, dq_order_offset), so dQ is the same bits run to run: the
// FA3 scheme; the waits for the turn and for the sums to land are the writer's, so the
// consumers only feel them when the writer falls a whole buffer behind.
#include "attention_sm90.cuh"

namespace rk {

// One 64-query x 64-column chunk of dQ in dq_accum, float32 in the order of the m64n64
// accumulator fragment: [n8 block nb][thread wt of the warpgroup][4], the 4 floats of
// thread wt being rows r, r + 8 (r = 16 (wt / 32) + (wt % 32) / 4) and columns
// 8 nb + 2 (wt % 4) + {0, 1}. A head's tiles: [query tile][chunk], queries padded to 64
// and D to its bucket.
struct DqTile {
  static constexpr int kFloats = 64 * 64;
  struct alignas(16) F4 {
    float x, y, z, w;
  };
  // float offset of element (query i, column c) in a head's tiles
  __host__ __device__ static int64_t offset(int i, int c, int d_bucket) {
    const int r = i % 64, cc = c % 64;
    const int wt = 32 * (r / 16) + 4 * (r % 8) + (cc % 8) / 2;
    const int e = 2 * ((r % 16) / 8) + (cc % 2);
    return (int64_t(i / 64) * (d_bucket / 64) + c / 64) * kFloats + (cc / 8) * 512 + wt * 4 + e;
  }
};

__host__ __device__ inline int64_t dq_tiles_per_head(int nq, int d_bucket) {
  return int64_t((nq + 63) / 64) * (d_bucket / 64);
}

__host__ __device__ inline int dq_bucket(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// The workspace after the DqTiles: one int32 counter per (batch, head, 64-query tile), the
// number of (key block, consumer) reductions already added into the tile. Deterministic
// launches add in the order ticket = key block * consumers + consumer: each waits for the
// counter to reach its ticket, adds, waits for its sums to land, then increments it.
__host__ __device__ inline int64_t dq_order_offset(const AttnArgs& a) {
  return int64_t(a.b) * a.h * dq_tiles_per_head(a.nq, dq_bucket(a.d)) * DqTile::kFloats;
}

template <class T, int kD_>
struct BwdSm90Cfg {
  // consumer warpgroups, 64 keys each: one at D = 128 (a 256-thread block, whose threads
  // ptxas may give 255 registers: dK and dV alone take 128; with 384 threads it allots 168
  // and spills 150-250 bytes)
  static constexpr int kD = kD_;
  static constexpr int kConsumers = kD <= 64 ? 2 : 1;  // (D = 256: one, two sweeps)
  static constexpr int kBlockN = 64 * kConsumers;  // keys per block
  static constexpr int kBlockM = 64;   // queries per step
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kChunks = kD / 64;
  static constexpr int kKBytes = kBlockN * kD * 2;  // K (and V)
  static constexpr int kQBytes = kBlockM * kD * 2;  // one Q (or dO) stage
  static constexpr int kdSBytes = kBlockM * kBlockN * 2;
  // dQ staging buffers (DqTile) per consumer: one per 64-column chunk, except at D = 256,
  // where only one fits (the chunks then wait for each other's reduction to read it)
  static constexpr int kStageBufs = kD <= 128 ? kD / 64 : 1;
  static constexpr int kStageBytes = kConsumers * kStageBufs * 16384;
  static constexpr int kProducerRegs = 40, kConsumerRegs = kConsumers == 1 ? 256 : 232;
  static constexpr int kLdBytes = 2 * kBlockM * 4;  // lse * log2(e) and delta of one stage
  static constexpr size_t kSmemBytes = 1024 + 2 * size_t(kKBytes) + 2 * size_t(kStages) * kQBytes +
                                       size_t(kdSBytes) + size_t(kStageBytes) +
                                       size_t(kStages) * kLdBytes + 1024;
  static constexpr bool kTwoPass = kD > 128;  // dV, then dK + dQ: see kPass
  // named barriers of the dQ handshake, per staging buffer j = consumer * kStageBufs + buf
  // (ids 1, 2: the consumers' own warpgroup barriers): "full" (consumer -> writer) and
  // "empty" (writer -> consumer), of the consumer warpgroup and the writer warp
  static constexpr int kBufs = kConsumers * kStageBufs;
  static constexpr int kHandshake = 128 + 32;
  __host__ __device__ static constexpr int bar_full(int j) { return 3 + 2 * j; }
  __host__ __device__ static constexpr int bar_empty(int j) { return 4 + 2 * j; }
  static_assert(4 + 2 * (kBufs - 1) <= 15, "out of named barriers");
};

// The dQ writer (warp 1 of the producer warpgroup): per query step, consumer and 64-column
// chunk, in the consumers' order, waits for the staging buffer to be full, adds it to
// dq_accum by one bulk reduction (lane 0) and, once the reduction has read it, gives the
// buffer back (each buffer starts out given; its last use is not given back, so that no
// barrier phase is left open). deterministic: before a tile's first chunk the warp waits
// for its turn (ticket = key block * consumers + consumer) on the tile's counter; after the
// last one it waits for the sums to land (wait_group 0, not .read) and passes the turn on.
// The consumers never wait for either: only for a buffer to come back.
template <class Cfg>
__device__ inline void dq_writer(const AttnArgs& p, float* sStage, int64_t bh, int n_block, int m_first,
                                 int m_count, int lane) {
  constexpr int kM = Cfg::kBlockM, kChunks = Cfg::kChunks, kStageBufs = Cfg::kStageBufs;
  if (m_count == 0) return;
  float* dq_acc_g = reinterpret_cast<float*>(p.dq_accum) + bh * dq_tiles_per_head(p.nq, Cfg::kD) * DqTile::kFloats;
  int* order = p.deterministic ? reinterpret_cast<int*>(p.dq_accum) + dq_order_offset(p) + bh * ((p.nq + kM - 1) / kM)
                               : nullptr;
  for (int j = 0; j < Cfg::kBufs; ++j) named_bar_arrive(Cfg::bar_empty(j), Cfg::kHandshake);
  for (int it = 0; it < m_count; ++it) {
    const int m = m_first + it;  // query tile
    for (int wg = 0; wg < Cfg::kConsumers; ++wg) {
      for (int c = 0; c < kChunks; ++c) {
        const int j = wg * kStageBufs + c % kStageBufs;
        named_bar_sync(Cfg::bar_full(j), Cfg::kHandshake);
        if (order != nullptr && c == 0) {  // the tile's earlier tickets have landed
          flag_wait_ge(order + m, n_block * Cfg::kConsumers + wg);
          fence_proxy_async_global();
        }
        if (lane == 0) {
          bulk_reduce_add_f32(dq_acc_g + (int64_t(m) * kChunks + c) * DqTile::kFloats,
                              sStage + j * DqTile::kFloats, DqTile::kFloats * 4);
          bulk_commit();
          if (order != nullptr && c + 1 == kChunks) {  // this ticket's sums in global memory
            bulk_wait<0>();
            fence_proxy_async_global();
            flag_release_add(order + m, 1);
          } else {
            bulk_wait_read<0>();
          }
        }
        syncwarp();
        if (it + 1 < m_count || c + kStageBufs < kChunks) named_bar_arrive(Cfg::bar_empty(j), Cfg::kHandshake);
      }
    }
  }
}

struct BwdSm90Params {
  TmaDesc tq, tk, tv, tdo;
  AttnArgs a;
};

// kPass: 0 all five products (D <= 128); at D = 256 two launches, 1 only dV (P^T, no
// dP^T) and 2 only dK and dQ: one accumulator of 128 registers each, S^T computed twice
// (six GEMMs instead of five).
template <class T, int kD, bool kMask, bool kDrop, int kPass>
__global__ void __launch_bounds__(BwdSm90Cfg<T, kD>::kThreads, 1) attn_bwd_sm90_kernel(const __grid_constant__ BwdSm90Params prm) {
#if RK_SM90_DEVICE || defined(RECON_EMULATE)
  using Cfg = BwdSm90Cfg<T, kD>;
  constexpr int kN = Cfg::kBlockN, kM = Cfg::kBlockM, kS = Cfg::kStages, kChunks = Cfg::kChunks;
  constexpr int kMB = kM / 8;  // n8 blocks of an S^T row fragment (queries)
  constexpr int kDB = kD / 8;  // n8 blocks of a dK / dV row fragment
  constexpr int kKChunk = kN * 128, kQChunk = kM * 128;  // bytes per 64-column chunk
  constexpr bool kDV = kPass != 2, kDK = kPass != 1;  // (D = 256: pass 1 dV, pass 2 dK + dQ)
  const AttnArgs& p = prm.a;

  unsigned char* base = smem_base();
#ifndef RECON_EMULATE  // (the emulator's shared memory is 1024-byte aligned)
  base += (1024 - (smem_u32(base) & 1023)) & 1023;
#endif
  unsigned char* sK = base;
  unsigned char* sV = sK + Cfg::kKBytes;
  unsigned char* sQ = sV + Cfg::kKBytes;         // kS stages
  unsigned char* sdO = sQ + kS * Cfg::kQBytes;   // kS stages
  unsigned char* sdS = sdO + kS * Cfg::kQBytes;  // dS (kM queries x kN keys), K-major
  float* sStage = reinterpret_cast<float*>(sdS + Cfg::kdSBytes);  // [consumer][buf] DqTile
  float* sLd = reinterpret_cast<float*>(sdS + Cfg::kdSBytes + Cfg::kStageBytes);  // [kS][lse2 | delta]
  uint64_t* bars = reinterpret_cast<uint64_t*>(sdS + Cfg::kdSBytes + Cfg::kStageBytes + kS * Cfg::kLdBytes);
  uint64_t* kv_full = bars;
  uint64_t* q_full = bars + 1;             // [kS]
  uint64_t* do_full = bars + 1 + kS;       // [kS]
  uint64_t* qdo_empty = bars + 1 + 2 * kS;  // [kS]
  uint64_t* ld_full = bars + 1 + 3 * kS;    // [kS]: lse / delta written by producer warp 0

  const int num_n = (p.nk + kN - 1) / kN;
  const int n_block = static_cast<int>(blockIdx.x % num_n);
  const int64_t bh = blockIdx.x / num_n;
  const int b = static_cast<int>(bh / p.h), h = static_cast<int>(bh % p.h);
  const int n0 = n_block * kN;
  const int shift = p.nk - p.nq;
  // causal: key j is seen by queries i >= j - shift only
  const int m_first = p.causal ? max(0, n0 - shift) / kM : 0;
  // a block of padding keys only (past the sequence's last real key, kpm_bounds) sweeps no
  // query: dK = dV = 0 and no dQ chunk. Such blocks are the last ones of the sequence, so
  // no deterministic ticket of a block that does sweep waits on them.
  const int m_count = n0 >= kpm_key_end(p, b) ? 0 : max(0, (p.nq + kM - 1) / kM - m_first);

  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < kS; ++s) {
      mbar_init(&q_full[s], 1);
      mbar_init(&do_full[s], 1);
      mbar_init(&qdo_empty[s], 128 * Cfg::kConsumers);
      mbar_init(&ld_full[s], 32);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (tid < 128) {  // ---------------------------------------------------- producer
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid < 32) {  // warp 0: thread 0 issues the TMA loads, all 32 stage lse / delta
      const float* lse_g = reinterpret_cast<const float*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
      const float* delta_g = reinterpret_cast<const float*>(p.delta) + bh * p.nq;
      if (tid == 0) {
        mbar_arrive_expect_tx(kv_full, 2 * Cfg::kKBytes);
        for (int c = 0; c < kChunks; ++c) {
          tma_load_4d(sK + c * kKChunk, &prm.tk, kv_full, 64 * c, n0, h, b);
          tma_load_4d(sV + c * kKChunk, &prm.tv, kv_full, 64 * c, n0, h, b);
        }
      }
      for (int it = 0; it < m_count; ++it) {
        const int s = it % kS, m0 = (m_first + it) * kM;
        if (it >= kS) mbar_wait(&qdo_empty[s], ((it / kS) + 1) & 1);
        if (tid == 0) {
          mbar_arrive_expect_tx(&q_full[s], Cfg::kQBytes);
          for (int c = 0; c < kChunks; ++c)
            tma_load_4d(sQ + s * Cfg::kQBytes + c * kQChunk, &prm.tq, &q_full[s], 64 * c, m0, h, b);
          mbar_arrive_expect_tx(&do_full[s], Cfg::kQBytes);
          for (int c = 0; c < kChunks; ++c)
            tma_load_4d(sdO + s * Cfg::kQBytes + c * kQChunk, &prm.tdo, &do_full[s], 64 * c, m0, h, b);
        }
        // lse * log2(e) (+inf past Nq: P = 0 there) and delta of the stage's queries
        float* ld = sLd + s * 2 * kM;
        for (int i = tid; i < kM; i += 32) {
          const int q = m0 + i;
          ld[i] = q < p.nq ? lse_g[q * p.lse_sm] * kLog2e : INFINITY;
          ld[kM + i] = q < p.nq ? delta_g[q] : 0.0f;
        }
        mbar_arrive(&ld_full[s]);
      }
    } else if (tid < 64 && kDK) {  // warp 1: the dQ writer
      dq_writer<Cfg>(p, sStage, bh, n_block, m_first, m_count, tid % 32);
    }
    return;
  }

  // ------------------------------------------------------------------------ consumers
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  // keys 64 wg .. 64 wg + 63 of the block (a constant with one consumer: the descriptors
  // and barrier ids fold, and D = 128 keeps clear of spills at 255 registers; else
  // warp-uniform to ptxas: descriptors in uniform registers)
  const int wg = Cfg::kConsumers == 1 ? 0 : warp_uniform(tid / 128 - 1);
  const int wt = tid % 128, warp = wt / 32, lane = wt % 32, g = lane / 4, t4 = lane % 4;
  const int kr_lo = n0 + 64 * wg + 16 * warp + g;  // this thread's keys kr_lo, kr_lo + 8
  const MaskView mv = make_mask_view(p, b, h);
  const DropoutView drop = make_dropout_view(p, bh);
  const float sl2 = p.scale * kLog2e;
  const int d = p.d;
  float* stage = sStage + wg * Cfg::kStageBufs * DqTile::kFloats;

  // Descriptors (start-address field plus byte offset / 16, as in the forward).
  //  K-major, rows of this warpgroup: K (A of S^T), V (A of dP^T); rows of the stage: Q, dO
  //  (B of S^T, dP^T); MN-major: dO, Q (B of dV, dK: queries 16 kk.., D chunks LBO apart),
  //  K (B of dQ: keys 64 wg + 16 kk.., D chunk c); dS (A of dQ, K-major: chunk wg).
  const uint64_t k_km0 = make_desc(sK + wg * 64 * 128, 16, 1024, 128);
  const uint64_t v_km0 = make_desc(sV + wg * 64 * 128, 16, 1024, 128);
  const uint64_t q_km0 = make_desc(sQ, 16, 1024, 128);
  const uint64_t do_km0 = make_desc(sdO, 16, 1024, 128);
  const uint64_t q_mn0 = make_desc(sQ, kQChunk, 1024, 128);
  const uint64_t do_mn0 = make_desc(sdO, kQChunk, 1024, 128);
  const uint64_t k_mn0 = make_desc(sK + wg * 64 * 128, kKChunk, 1024, 128);
  const uint64_t ds_km0 = make_desc(sdS + wg * kM * 128, 16, 1024, 128);
  auto off = [](int bytes) { return uint64_t(bytes >> 4); };
  auto km_step = [](int kk, int chunk_bytes) { return (kk / 4) * chunk_bytes + (kk % 4) * 32; };
  // a stage's base descriptor once per step, then each k16 step adds an immediate (ptxas
  // otherwise rebuilds every descriptor from the stage index: ~1 instruction per score
  // element more)
  auto stage_desc = [](uint64_t d0, int s) { return d0 + uint64_t(uint32_t(s) * (Cfg::kQBytes >> 4)); };

  float acc_dv[kDV ? kDB : 1][4], acc_dk[kDK ? kDB : 1][4];
  for (auto& r : acc_dv)
    for (float& x : r) x = 0.0f;
  for (auto& r : acc_dk)
    for (float& x : r) x = 0.0f;
  mbar_wait(kv_full, 0);
  {
    for (int it = 0; it < m_count; ++it) {
      const int s = it % kS, ph = (it / kS) & 1, m0 = (m_first + it) * kM;
      float st[kMB][4], dpt[kMB][4];
      const float* lse2 = sLd + s * 2 * kM;  // by local query column 8 mb + 2 t4 + c
      const uint64_t q_km = stage_desc(q_km0, s), do_km = stage_desc(do_km0, s);
      const uint64_t q_mn = stage_desc(q_mn0, s), do_mn = stage_desc(do_mn0, s);
      const float* dlt = lse2 + kM;
      mbar_wait(&q_full[s], ph);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        wgmma_ss<T, kM>(reinterpret_cast<float(&)[kM / 2]>(st), k_km0 + off(km_step(kk, kKChunk)),
                        q_km + off(km_step(kk, kQChunk)), kk > 0);
      wgmma_commit();
      mbar_wait(&do_full[s], ph);
      if constexpr (kDK) {
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk)
          wgmma_ss<T, kM>(reinterpret_cast<float(&)[kM / 2]>(dpt), v_km0 + off(km_step(kk, kKChunk)),
                          do_km + off(km_step(kk, kQChunk)), kk > 0);
        wgmma_commit();
        wgmma_wait<1>();  // S^T has landed (dP^T still runs)
      } else {
        wgmma_wait<0>();  // (the dV pass has no dP^T)
      }
      mbar_wait(&ld_full[s], ph);
      const bool full = !kMask || mv.all_allowed(m0, m0 + kM, n0 + kN);
      // this thread's query columns 8 mb + 2 t4 + (0, 1): one 8-byte load per pair
      // (the stage arrays and 2 t4 are even), of lse here and of delta below
      float2 lse_c[kMB];
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) lse_c[mb] = *reinterpret_cast<const float2*>(lse2 + 8 * mb + 2 * t4);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pe = ex2_approx(fmaf(st[mb][e], sl2, -((e & 1) ? lse_c[mb].y : lse_c[mb].x)));
          if (kMask && !full && !mv.allowed(m0 + 8 * mb + 2 * t4 + (e & 1), kr_lo + 8 * (e >> 1)))
            pe = 0.0f;
          st[mb][e] = pe;
        }
      }
      if constexpr (kDK) wgmma_wait<0>();  // dP^T has landed
      uint32_t pf[kM / 16][4], dsf[kM / 16][4];
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        const float2 dl = *reinterpret_cast<const float2*>(dlt + 8 * mb + 2 * t4);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = st[mb][e];
          float dp = kDK ? dpt[mb][e] : 0.0f;
          if constexpr (kDrop) {
            const uint32_t idx = static_cast<uint32_t>(m0 + 8 * mb + 2 * t4 + (e & 1)) * drop.nk +
                                 static_cast<uint32_t>(kr_lo + 8 * (e >> 1));
            const bool keep = drop.keep_at(idx);
            dp = keep ? dp * drop.scale : 0.0f;
            st[mb][e] = keep ? pe * drop.scale : 0.0f;  // P^T o Z, the A operand of dV
          }
          if constexpr (kDK) dpt[mb][e] = pe * (dp - ((e & 1) ? dl.y : dl.x));  // dS^T
        }
      }
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        if constexpr (kDV) acc_to_a_frag<T>(pf[kk], st[2 * kk], st[2 * kk + 1]);
        if constexpr (kDK) acc_to_a_frag<T>(dsf[kk], dpt[2 * kk], dpt[2 * kk + 1]);
      }
      if constexpr (kDK) {
        // dS^T -> shared memory as dS [query][key] (chunk wg: this warpgroup's 64 keys,
        // 128-byte rows, the 128B swizzle of the wgmma atom) by stmatrix.trans: dsf[kk]
        // register i is the 8 x 8 block keys 16 warp + 8 (i % 2).., queries 16 kk +
        // 8 (i / 2)..; lane l addresses query row l % 8 of block l / 8 (16 bytes of keys)
#pragma unroll
        for (int kk = 0; kk < kM / 16; ++kk) {
          const int q = 16 * kk + 8 * (lane / 16) + lane % 8;
          uint32_t o = static_cast<uint32_t>(wg * kM * 128 + q * 128 + 2 * (16 * warp + 8 * ((lane / 8) % 2)));
          o ^= ((o >> 7) & 7u) << 4;
          stsm_x4_trans(sdS + o, dsf[kk]);
        }
        fence_proxy_async();
        warpgroup_bar(1 + wg);
      }

      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kM / 16; ++kk) {
        if constexpr (kDV)
          wgmma_rs<T, kD, true>(reinterpret_cast<float(&)[kD / 2]>(acc_dv), pf[kk],
                                do_mn + off(kk * 16 * 128), 1);
        if constexpr (kDK)
          wgmma_rs<T, kD, true>(reinterpret_cast<float(&)[kD / 2]>(acc_dk), dsf[kk],
                                q_mn + off(kk * 16 * 128), 1);
      }
      wgmma_commit();
      if constexpr (kDK) {
        // dQ (this warpgroup's 64 keys), 64 columns of D at a time: the fragment goes to
        // a staging buffer (once the dQ writer has given it back: "empty"), handed to the
        // writer ("full"), which adds it to dq_accum with a bulk reduction. Queries
        // past Nq have dS = 0 (P = 0 there): their rows of the padded tile add zeros.
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          float dq[8][4];
#pragma unroll
          for (int kk = 0; kk < 4; ++kk)
            wgmma_ss<T, 64, true>(reinterpret_cast<float(&)[32]>(dq), ds_km0 + off(kk * 32),
                                  k_mn0 + off(c * kKChunk + kk * 16 * 128), kk > 0);
          wgmma_commit();
          const int j = wg * Cfg::kStageBufs + c % Cfg::kStageBufs;
          named_bar_sync(Cfg::bar_empty(j), Cfg::kHandshake);  // (under the wgmma)
          wgmma_wait<0>();
          float* buf = stage + (c % Cfg::kStageBufs) * DqTile::kFloats;
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
            reinterpret_cast<DqTile::F4*>(buf)[nb * 128 + wt] = DqTile::F4{dq[nb][0], dq[nb][1], dq[nb][2], dq[nb][3]};
          fence_proxy_async();
          named_bar_arrive(Cfg::bar_full(j), Cfg::kHandshake);
          if (c + 1 < kChunks) wgmma_fence();
        }
      } else {
        wgmma_wait<0>();
      }
      mbar_arrive(&qdo_empty[s]);  // Q_j, dO_j and dS read by every product of this step
    }
  }
  // dK = scale dS^T Q, dV: rows kr_lo, kr_lo + 8
  auto store = [&](uint64_t ptr, int64_t sb, int64_t sh, int64_t sm, const auto& acc, float scale) {
    T* out = reinterpret_cast<T*>(ptr) + b * sb + h * sh;
    const bool pair = (reinterpret_cast<uintptr_t>(out) % (2 * sizeof(T)) == 0) && sm % 2 == 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = kr_lo + 8 * i;
      if (r >= p.nk) continue;
#pragma unroll
      for (int db = 0; db < kDB; ++db) {
        if (db * 8 >= d) continue;
        store2<T>(out + r * sm, db * 8 + 2 * t4, d, acc[db][2 * i] * scale, acc[db][2 * i + 1] * scale,
                  pair);
      }
    }
  };

  if constexpr (kDK) store(p.dk, p.dk_sb, p.dk_sh, p.dk_sm, acc_dk, p.scale);
  if constexpr (kDV) store(p.dv, p.dv_sb, p.dv_sh, p.dv_sm, acc_dv, 1.0f);
#endif
}

struct DqConvertParams {
  AttnArgs a;
  int d_bucket;
};

// dq = scale * dq_accum in the input dtype (one thread per element pair; DqTile order).
template <class T>
__global__ void __launch_bounds__(256) attn_bwd_dq_convert_sm90_kernel(const DqConvertParams prm) {
  const AttnArgs& p = prm.a;
  const int64_t half = int64_t(p.d + 1) / 2;
  const int64_t idx = int64_t(blockIdx.x) * 256 + threadIdx.x;
  const int64_t rows = int64_t(p.b) * p.h * p.nq;
  if (idx >= rows * half) return;
  const int64_t row = idx / half;
  const int c = static_cast<int>(2 * (idx % half));
  const int64_t bh = row / p.nq, b = bh / p.h, h = bh % p.h;
  const int i = static_cast<int>(row % p.nq);
  const float* acc = reinterpret_cast<const float*>(p.dq_accum) +
                     bh * dq_tiles_per_head(p.nq, prm.d_bucket) * DqTile::kFloats +
                     DqTile::offset(i, c, prm.d_bucket);
  T* dq = reinterpret_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + i * p.dq_sm;
  dq[c] = from_float<T>(acc[0] * p.scale);
  if (c + 1 < p.d) dq[c + 1] = from_float<T>(acc[1] * p.scale);
}

std::string attention_bwd_sm90_why_not(const AttnArgs& a) {
  if (a.dtype != kFloat16 && a.dtype != kBFloat16) return "dtype is not float16/bfloat16";
  const int64_t n[4] = {a.nq, a.nk, a.nk, a.nq};
  const int64_t st[4][3] = {{a.q_sm, a.q_sh, a.q_sb},
                            {a.k_sm, a.k_sh, a.k_sb},
                            {a.v_sm, a.v_sh, a.v_sb},
                            {a.do_sm, a.do_sh, a.do_sb}};
  for (int i = 0; i < 4; ++i)
    if (!tma_describable(a, n[i], st[i][0], st[i][1], st[i][2]))
      return "a q/k/v/dout stride is not a positive multiple of 16 bytes (TMA)";
  return "";
}

int64_t attention_bwd_workspace(const AttnArgs& a) {
  return dq_order_offset(a) + int64_t(a.b) * a.h * ((a.nq + 63) / 64);
}

std::string attention_bwd_choice(const AttnArgs& a) {
  return sm90_choice(a, attention_bwd_sm90_why_not(a), "kernels");
}

template <class T, int kD, bool kMask, bool kDrop>
static std::string launch_attn_bwd_sm90(const AttnArgs& a, uintptr_t stream) {
  using Cfg = BwdSm90Cfg<T, kD>;
  BwdSm90Params prm{};
  prm.a = a;
  const TmaOperand ops[] = {{&prm.tq, a.q, a.nq, a.q_sm, a.q_sh, a.q_sb, Cfg::kBlockM, "q"},
             {&prm.tk, a.k, a.nk, a.k_sm, a.k_sh, a.k_sb, Cfg::kBlockN, "k"},
             {&prm.tv, a.v, a.nk, a.v_sm, a.v_sh, a.v_sb, Cfg::kBlockN, "v"},
             {&prm.tdo, a.dout, a.nq, a.do_sm, a.do_sh, a.do_sb, Cfg::kBlockM, "dout"}};
  std::string tma_err = make_attn_tmas("attention_bwd (sm90)", a, ops);
  if (!tma_err.empty()) return tma_err;
  const int64_t blocks = int64_t((a.nk + Cfg::kBlockN - 1) / Cfg::kBlockN) * a.b * a.h;
  const int64_t pairs = int64_t(a.b) * a.h * a.nq * ((a.d + 1) / 2);
  if (blocks > 0x7fffffff || (pairs + 255) / 256 > 0x7fffffff)
    return "attention_bwd: too many blocks (B * H * N too large)";
  std::string err;
  {
#ifdef RECON_EMULATE
    ::rk::emu::SmemLimitSm90 sm90_limit;
#endif
    const dim3 grid(static_cast<unsigned>(blocks)), block(Cfg::kThreads);
    if constexpr (Cfg::kTwoPass) {
      err = launch(attn_bwd_sm90_kernel<T, kD, kMask, kDrop, 1>, "attention_bwd_sm90", grid, block,
                   Cfg::kSmemBytes, stream, prm);
      if (err.empty())
        err = launch(attn_bwd_sm90_kernel<T, kD, kMask, kDrop, 2>, "attention_bwd_sm90", grid, block,
                     Cfg::kSmemBytes, stream, prm);
    } else {
      err = launch(attn_bwd_sm90_kernel<T, kD, kMask, kDrop, 0>, "attention_bwd_sm90", grid, block,
                   Cfg::kSmemBytes, stream, prm);
    }
  }
  if (!err.empty()) return err;
  const DqConvertParams cp{a, kD};
  return launch(attn_bwd_dq_convert_sm90_kernel<T>, "attention_bwd_sm90 (dq convert)",
                dim3(static_cast<unsigned>((pairs + 255) / 256)), dim3(256), 0, stream, cp);
}

// After the delta kernel (attention_bwd.cu).
std::string attention_bwd_sm90(const AttnArgs& a, uintptr_t stream) {
  std::string err = attention_bwd_sm90_why_not(a);
  if (!err.empty()) return "attention_bwd (sm90): " + err;
  if (a.dq_accum == 0 || a.dq_accum % 16 != 0)
    return "attention_bwd (sm90): dq_accum must be a zeroed, 16-byte aligned float32 workspace of "
           "attention_bwd_workspace(args) elements";
  return dispatch_sm90(a, [&](auto t, auto kd, auto mask, auto drop) {
    return launch_attn_bwd_sm90<typename decltype(t)::type, decltype(kd)::value, decltype(mask)::value,
                                decltype(drop)::value>(a, stream);
  });
}

}  // namespace rk
