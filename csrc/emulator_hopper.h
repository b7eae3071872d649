// Emulator models of the Hopper (sm_90a) primitives of csrc/hopper.cuh, from the PTX ISA:
//   * wgmma.mma_async m64nNk16 (f16/bf16 -> f32), A from a shared-memory matrix descriptor
//     (K-major) or from registers, B from a descriptor, K-major or (imm-trans-b 1) MN-major.
//     Descriptor fields: bits 0-13 start
//     address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 49-51
//     base offset (must be 0 here), 62-63 layout: 0 interleave (no swizzle), 1 128B, 2 64B,
//     3 32B swizzle. Element (row, k) of an 8-row core-matrix group sits at
//       no swizzle: start + (row/8) SBO + (row%8) 16 + (k/8) LBO + 2 (k%8)
//       swizzle W:  start + (row/8) SBO + (row%8) W + 2 k, then address bits [4, 4+b)
//                   ^= bits [7, 7+b) (b = 3, 2, 1 for W = 128, 64, 32)
//     and element (mn, k) of an MN-major operand (CUTLASS's canonical GMMA MN layouts) at
//       no swizzle: start + (mn/8) SBO + (k/8) LBO + (k%8) 16 + 2 (mn%8)
//       swizzle W:  start + (mn/(W/2)) LBO + (k/8) SBO + (k%8) W + 2 (mn%(W/2)), swizzled
//     (shared addresses are offsets from the 1024-byte aligned dynamic shared memory, so the
//     XOR sees the same bits as the hardware). Accumulator fragment: thread t of the
//     warpgroup holds rows 16 (t/32) + (t%32)/4 (+8) and, per n8 block j, columns
//     8j + 2 (t%4) (+1): d[4j..4j+3] = (r, c), (r, c+1), (r+8, c), (r+8, c+1).
//     Unforgiving: issuing poisons the accumulator registers with NaN; the product lands only
//     at the wgmma.wait_group that covers its commit group (a result read early is NaN), and
//     is computed from shared memory as it is at that wait (smem overwritten too early shows
//     up). wgmma.mma_async without a wgmma.fence since the last wait is an error.
//   * mbarrier: init / arrive / arrive.expect_tx / try_wait.parity with phase and tx-count
//     completion; the state lives beside the 8 bytes of the barrier (keyed by address).
//   * cp.async.bulk.tensor 2D/3D/4D loads (tile mode) from a host-built TmaDesc with zero fill
//     out of bounds and the same swizzle; a copy lands (and completes its bytes on the
//     barrier) only when a thread waits on that barrier: reading before the wait sees stale
//     shared memory (0xFF bytes: NaN).
//   * cp.reduce.async.bulk (global += shared, .add.f32) in per-thread bulk async-groups:
//     the source read at the wait_group.read that covers the group, the sums added to
//     global memory at a wait_group (no .read) or at the block's exit (see below).
//   * setmaxnreg.inc/dec: warpgroup-collective, every thread the same count, 24..256, a
//     multiple of 8 (no numeric effect).
//   * bar.sync / bar.arrive id, n (named barriers of n threads, the producer / consumer
//     handshakes between warpgroups), checked for consistent counts and left-over arrivals.
// A warpgroup is 128 consecutive threads (4 warps); its collectives park the fibers until
// all 128 arrive; the last one computes for all.
#pragma once

#include <limits>
#include <map>

namespace rk {
namespace emu {

// The CUtensorMap stand-in of emulator builds (hopper.cuh's TmaDesc).
struct TmaDesc {
  const unsigned char* base = nullptr;
  int rank = 0;       // 2..4
  int esize = 2;      // bytes per element
  int64_t dims[4] = {1, 1, 1, 1};     // elements, innermost first
  int64_t strides[4] = {0, 0, 0, 0};  // bytes; strides[0] = esize
  int box[4] = {1, 1, 1, 1};
  int swizzle = 0;  // bytes: 0 (none), 32, 64, 128
};

struct MBar {
  int expected = 0, pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
};

struct BulkCopy {
  TmaDesc d;
  unsigned char* dst;
  int c[4];
  uint32_t bar;
};

struct WgmmaOp {
  int n = 0, dtype = 0;  // 1 f16, 2 bf16
  bool a_regs = false, trans_b = false;
  uint64_t da = 0, db = 0;
  uint32_t a[128][4];
  float* acc[128];
  std::vector<float> in;  // 128 x n/2 snapshot (scale_d) or empty (scale_d = 0)
  bool scale_d = true;
};

struct WarpGroup {
  int arrived = 0;
  uint64_t gen = 0;
  int op = 0;
  const void* in[128];
  bool fenced = false;
  std::vector<WgmmaOp> open;
  std::deque<std::vector<WgmmaOp>> groups;
};

struct BulkReduce {
  float* dst;
  uint32_t src;  // shared-memory offset
  int bytes;
};

// The sums of a group whose source has been read (wait_group.read) but that need not have
// landed in global memory yet.
struct BulkSum {
  float* dst;
  std::vector<float> add;
};

// One thread's bulk async-groups (cp.reduce.async.bulk ... .bulk_group).
struct BulkGroups {
  std::vector<BulkReduce> open;
  std::deque<std::vector<BulkReduce>> groups;
  std::vector<BulkSum> read;  // read, not yet written
};

// bar.sync / bar.arrive id, n: completes when n threads have arrived (bar.sync waits for
// that, bar.arrive does not); every arrival of a phase must name the same n.
struct NamedBar {
  int expected = 0, arrived = 0;
  uint64_t gen = 0;
};

struct HopperState {
  NamedBar named[16];
  std::map<uint32_t, MBar> bars;
  std::vector<BulkCopy> copies;
  std::vector<WarpGroup> wgs;
  std::vector<BulkGroups> bulk;  // per thread
};

// One per resident block (State::slot).
inline HopperState& hs() {
  static std::vector<std::unique_ptr<HopperState>> v;
  const size_t i = static_cast<size_t>(st().slot);
  while (v.size() <= i) v.emplace_back(new HopperState());
  return *v[i];
}

inline void hopper_reset(int nthreads) {
  HopperState& h = hs();
  for (NamedBar& b : h.named) b = NamedBar();
  h.bars.clear();
  h.copies.clear();
  h.wgs.clear();
  h.wgs.resize((nthreads + 127) / 128);
  h.bulk.assign(static_cast<size_t>(nthreads), BulkGroups());
}

inline uint32_t smem_off(const void* p, size_t bytes, const char* what) {
  State& s = st();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < s.smem || c + bytes > s.smem + s.smem_size)
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  return static_cast<uint32_t>(c - s.smem);
}

inline uint32_t swz(uint32_t addr, int width) {
  const int bits = width == 128 ? 3 : width == 64 ? 2 : width == 32 ? 1 : 0;
  return addr ^ (((addr >> 7) & ((1u << bits) - 1)) << 4);
}

// Parks the thread until the 128 threads of its warpgroup reach the same collective; the
// last one to arrive runs `all(inputs)`. Returns after everyone has arrived.
template <class F>
inline void wg_collective(int op, const void* in, F&& all) {
  State& s = st();
  Fiber& f = *s.cur;
  const int t = static_cast<int>(&f - s.fibers.data());
  const int g = t / 128;
  if (s.nthreads < (g + 1) * 128)
    fail("warpgroup collective in a block of " + std::to_string(s.nthreads) +
         " threads: warpgroup " + std::to_string(g) + " is incomplete (need 128 threads)");
  WarpGroup& w = hs().wgs[g];
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("warpgroup " + std::to_string(g) + ": threads reached different warpgroup collectives (" +
         std::to_string(w.op) + " vs " + std::to_string(op) + ")");
  }
  w.in[t % 128] = in;
  const uint64_t gen = w.gen;
  if (++w.arrived == 128) {
    all(w.in, w, g);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = 4;
    f.wait_gen = gen;
    f.wait_key = static_cast<uint32_t>(g);
    yield();
  }
}

enum WgOp : int { kWgFence = 101, kWgMma, kWgCommit, kWgWait, kWgMaxReg, kWgMaxRegDec, kWgBar };

// bar.sync id, 128 by the threads of one warpgroup (a named barrier of its own).
inline void warpgroup_bar() {
  wg_collective(kWgBar, nullptr, [](const void* const*, WarpGroup&, int) {});
}

inline void wgmma_fence() {
  wg_collective(kWgFence, nullptr, [](const void* const*, WarpGroup& w, int) { w.fenced = true; });
}

inline void wgmma_commit() {
  wg_collective(kWgCommit, nullptr, [](const void* const*, WarpGroup& w, int) {
    w.groups.push_back(std::move(w.open));
    w.open.clear();
  });
}

// Element (row, k) of a K-major operand described by desc (16-bit elements); mn_major: element
// (mn = row, k) of an MN-major one.
inline float desc_elem(uint64_t desc, int row, int k, int dtype, bool mn_major = false) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int mode = static_cast<int>(desc >> 62);
  const int width = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  uint32_t addr;
  if (mn_major) {
    if (width == 0)
      addr = start + (row / 8) * sbo + (k / 8) * lbo + (k % 8) * 16 + 2 * (row % 8);
    else
      addr = swz(start + (row / (width / 2)) * lbo + (k / 8) * sbo + (k % 8) * width +
                     2 * (row % (width / 2)),
                 width);
  } else if (width == 0) {
    addr = start + (row / 8) * sbo + (row % 8) * 16 + (k / 8) * lbo + 2 * (k % 8);
  } else {
    addr = swz(start + (row / 8) * sbo + (row % 8) * width + 2 * k, width);
  }
  State& s = st();
  if (addr + 2 > s.smem_size) fail("wgmma: descriptor addresses past the shared memory");
  uint16_t bits;
  memcpy(&bits, s.smem + addr, 2);
  return dtype == 1 ? half_bits_to_float<__half>(bits) : half_bits_to_float<__nv_bfloat16>(bits);
}

inline float reg_half(uint32_t reg, int hi, int dtype) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
  return dtype == 1 ? half_bits_to_float<__half>(bits) : half_bits_to_float<__nv_bfloat16>(bits);
}

inline void wgmma_complete(WgmmaOp& op) {
  const int n = op.n;
  std::vector<float> A(64 * 16), B(static_cast<size_t>(n) * 16);
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 16; ++k) {
      if (op.a_regs) {
        // mma.m16n8k16 A fragment per warp: warp r/16, lane (r%8)*4 + (k%8)/2,
        // register (r%16 >= 8) + 2 (k >= 8), half k % 2
        const int rr = r % 16;
        const int t = (r / 16) * 32 + (rr % 8) * 4 + (k % 8) / 2;
        A[r * 16 + k] = reg_half(op.a[t][(rr >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2, op.dtype);
      } else {
        A[r * 16 + k] = desc_elem(op.da, r, k, op.dtype);
      }
    }
  for (int c = 0; c < n; ++c)
    for (int k = 0; k < 16; ++k) B[c * 16 + k] = desc_elem(op.db, c, k, op.dtype, op.trans_b);
  for (int t = 0; t < 128; ++t) {
    const int r0 = 16 * (t / 32) + (t % 32) / 4;
    for (int i = 0; i < n / 2; ++i) {
      const int j = i / 4, e = i % 4;
      const int r = r0 + 8 * (e / 2), c = 8 * j + 2 * (t % 4) + (e % 2);
      float acc = op.scale_d ? (op.in.empty() ? op.acc[t][i] : op.in[t * (n / 2) + i]) : 0.f;
      for (int k = 0; k < 16; ++k) acc = fmaf(A[r * 16 + k], B[c * 16 + k], acc);
      op.acc[t][i] = acc;
    }
  }
}

struct WgmmaIn {
  float* acc;
  const uint32_t* a;
  uint64_t da, db;
  int scale_d;
};

inline void wgmma_issue(int n, int dtype, float* acc, const uint32_t* a, uint64_t da, uint64_t db,
                        int scale_d, bool trans_b = false) {
  WgmmaIn in{acc, a, da, db, scale_d};
  wg_collective(kWgMma, &in, [n, dtype, trans_b](const void* const* ins, WarpGroup& w, int g) {
    if (!w.fenced) fail("wgmma.mma_async without a wgmma.fence since the last wait_group");
    if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma.mma_async: N outside 8..256 or not a multiple of 8");
    WgmmaOp op;
    op.n = n;
    op.dtype = dtype;
    op.trans_b = trans_b;
    const WgmmaIn& i0 = *static_cast<const WgmmaIn*>(ins[0]);
    op.a_regs = i0.a != nullptr;
    op.da = i0.da;
    op.db = i0.db;
    op.scale_d = i0.scale_d != 0;
    for (int t = 0; t < 128; ++t) {
      const WgmmaIn& it = *static_cast<const WgmmaIn*>(ins[t]);
      if (it.da != op.da || it.db != op.db || it.scale_d != i0.scale_d ||
          (it.a != nullptr) != op.a_regs)
        fail("wgmma.mma_async: descriptors / scale-d differ across the warpgroup");
      op.acc[t] = it.acc;
      if (op.a_regs) memcpy(op.a[t], it.a, sizeof(op.a[t]));
    }
    for (uint64_t d : {op.da, op.db}) {
      if (op.a_regs && d == op.da) continue;
      if (((d >> 49) & 7) != 0) fail("wgmma: descriptor base offset != 0 is not modeled");
    }
    // chained into an accumulator of a pending wgmma: the input is that result (read at
    // completion, in order); otherwise snapshot the registers now
    bool chained = false;
    auto pending = [&](const std::vector<WgmmaOp>& v) {
      for (const WgmmaOp& o : v)
        if (o.acc[0] == op.acc[0]) chained = true;
    };
    pending(w.open);
    for (const auto& grp : w.groups) pending(grp);
    if (!chained && op.scale_d) {
      op.in.resize(static_cast<size_t>(128) * (n / 2));
      for (int t = 0; t < 128; ++t) memcpy(&op.in[t * (n / 2)], op.acc[t], sizeof(float) * (n / 2));
    }
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < n / 2; ++i) op.acc[t][i] = std::numeric_limits<float>::quiet_NaN();
    (void)g;
    w.open.push_back(std::move(op));
  });
}

template <int N>
inline void wgmma_wait() {
  wg_collective(kWgWait, nullptr, [](const void* const*, WarpGroup& w, int) {
    if (!w.open.empty()) fail("wgmma.wait_group with uncommitted wgmma.mma_async");
    while (w.groups.size() > static_cast<size_t>(N)) {
      for (WgmmaOp& op : w.groups.front()) wgmma_complete(op);
      w.groups.pop_front();
    }
    w.fenced = false;
  });
}

template <bool kInc>
inline void setmaxnreg(int count) {
  wg_collective(kWgMaxReg + (kInc ? 0 : 1), &count,
                [](const void* const* ins, WarpGroup&, int g) {
                  const int c0 = *static_cast<const int*>(ins[0]);
                  for (int t = 0; t < 128; ++t)
                    if (*static_cast<const int*>(ins[t]) != c0)
                      fail("setmaxnreg: threads of warpgroup " + std::to_string(g) +
                           " ask for different counts");
                  if (c0 < 24 || c0 > 256 || c0 % 8 != 0)
                    fail("setmaxnreg: count " + std::to_string(c0) +
                         " outside [24, 256] or not a multiple of 8");
                });
}

// ------------------------------------------------------------------ mbarrier + TMA

inline MBar& bar_at(const void* p, const char* what) {
  const uint32_t off = smem_off(p, 8, what);
  if (off % 8 != 0) fail(std::string(what) + ": mbarrier not 8-byte aligned");
  auto it = hs().bars.find(off);
  if (it == hs().bars.end()) fail(std::string(what) + ": mbarrier used before mbarrier.init");
  return it->second;
}

inline void mbar_init(void* p, int count) {
  const uint32_t off = smem_off(p, 8, "mbarrier.init");
  if (off % 8 != 0) fail("mbarrier.init: not 8-byte aligned");
  if (count < 1 || count > (1 << 20) - 1) fail("mbarrier.init: count outside [1, 2^20 - 1]");
  MBar b;
  b.expected = b.pending = count;
  hs().bars[off] = b;
}

inline void mbar_maybe_complete(MBar& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
}

inline void mbar_expect_tx(void* p, int bytes) {
  MBar& b = bar_at(p, "mbarrier.expect_tx");
  if (bytes < 0 || bytes > (1 << 20) - 1) fail("mbarrier.expect_tx: bytes outside [0, 2^20 - 1]");
  b.tx += bytes;
}

inline void mbar_arrive(void* p) {
  MBar& b = bar_at(p, "mbarrier.arrive");
  if (b.pending == 0) fail("mbarrier.arrive: more arrivals than the count of the phase");
  --b.pending;
  mbar_maybe_complete(b);
}

inline void mbar_arrive_expect_tx(void* p, int bytes) {
  mbar_expect_tx(p, bytes);
  mbar_arrive(p);
}

inline void land(const BulkCopy& c) {
  const TmaDesc& d = c.d;
  State& s = st();
  const uint32_t dst = static_cast<uint32_t>(c.dst - s.smem);
  const int64_t row_bytes = static_cast<int64_t>(d.box[0]) * d.esize;
  for (int w = 0; w < d.box[3]; ++w)
    for (int z = 0; z < d.box[2]; ++z)
      for (int y = 0; y < d.box[1]; ++y)
        for (int x = 0; x < d.box[0]; ++x) {
          const int64_t gx = c.c[0] + x, gy = c.c[1] + y, gz = c.c[2] + z, gw = c.c[3] + w;
          const int64_t row = (static_cast<int64_t>(w) * d.box[2] + z) * d.box[1] + y;
          const uint32_t lin =
              dst + static_cast<uint32_t>(row * row_bytes + static_cast<int64_t>(x) * d.esize);
          unsigned char* out = s.smem + swz(lin, d.swizzle);
          const bool in = gx >= 0 && gx < d.dims[0] && gy >= 0 && gy < d.dims[1] && gz >= 0 &&
                          gz < d.dims[2] && gw >= 0 && gw < d.dims[3];
          if (in)
            memcpy(out,
                   d.base + gx * d.strides[0] + gy * d.strides[1] + gz * d.strides[2] +
                       gw * d.strides[3],
                   static_cast<size_t>(d.esize));
          else
            memset(out, 0, static_cast<size_t>(d.esize));
        }
}

inline int64_t box_bytes(const TmaDesc& d) {
  return static_cast<int64_t>(d.box[0]) * d.box[1] * d.box[2] * d.box[3] * d.esize;
}

inline void tma_load(void* dst, const TmaDesc& d, void* bar, int c0, int c1, int c2, int c3 = 0) {
  if (d.rank < 2 || d.rank > 4) fail("cp.async.bulk.tensor: tensor map of rank outside 2..4");
  const int64_t bytes = box_bytes(d);
  const uint32_t off = smem_off(dst, static_cast<size_t>(bytes), "cp.async.bulk.tensor destination");
  if (off % 128 != 0) fail("cp.async.bulk.tensor: shared destination not 128-byte aligned");
  bar_at(bar, "cp.async.bulk.tensor mbarrier");
  BulkCopy c{d, static_cast<unsigned char*>(dst), {c0, c1, c2, c3}, smem_off(bar, 8, "mbarrier")};
  hs().copies.push_back(c);
}

// try_wait.parity: true once the phase of parity `parity` has completed. Lands the copies
// that signal this barrier first (the only moment a bulk copy becomes visible).
inline bool mbar_try_wait(void* p, int parity) {
  MBar& b = bar_at(p, "mbarrier.try_wait");
  const uint32_t off = static_cast<uint32_t>(static_cast<unsigned char*>(p) - st().smem);
  auto& cs = hs().copies;
  for (size_t i = 0; i < cs.size();) {
    if (cs[i].bar == off) {
      land(cs[i]);
      b.tx -= box_bytes(cs[i].d);
      cs.erase(cs.begin() + static_cast<long>(i));
    } else {
      ++i;
    }
  }
  // tx-count may be negative for a while (bytes completed before their expect_tx): the
  // phase completes only at pending arrivals 0 and tx-count 0 (PTX ISA range +-(2^20 - 1))
  if (b.tx < -((1 << 20) - 1) || b.tx > (1 << 20) - 1) fail("mbarrier: tx-count out of range");
  mbar_maybe_complete(b);
  return (b.phase & 1) != static_cast<uint64_t>(parity & 1);
}

// Spins on try_wait (a fiber that cannot proceed parks until the barrier changes phase).
inline void mbar_wait(void* p, int parity) {
  while (!mbar_try_wait(p, parity)) {
    Fiber& f = *st().cur;
    f.wait = 5;
    f.wait_key = static_cast<uint32_t>(static_cast<unsigned char*>(p) - st().smem);
    f.wait_gen = bar_at(p, "mbarrier.try_wait").phase;
    yield();
  }
}

// ------------------------------------------------------------------ stmatrix
// stmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane l supplies the address of row l % 8
// of matrix l / 8 (16 bytes) and register i of matrix i in the mma fragment layout (lane l
// holds row l / 4, columns 2 (l % 4), +1). Without .trans row r of matrix i is stored as
// held; with .trans the transpose: stored row r, column c is fragment element (c, r).
struct StsmIn {
  void* row;
  uint32_t r[4];
};

inline void stsm_x4(void* p, const uint32_t (&r)[4], bool trans) {
  check_smem(p, 16, trans ? "stmatrix.trans" : "stmatrix");
  StsmIn in{p, {r[0], r[1], r[2], r[3]}};
  const unsigned char* all = exchange(trans ? kOpStsmT : kOpStsm, in);
  const int l = st().cur->lane, i = l / 8, row = l % 8;
  unsigned char* out = static_cast<unsigned char*>(p);
  for (int c = 0; c < 8; ++c) {
    const int src = trans ? 4 * c + row / 2 : 4 * row + c / 2;
    const int half = trans ? row % 2 : c % 2;
    const uint16_t v = static_cast<uint16_t>(slot<StsmIn>(all, src).r[i] >> (16 * half));
    memcpy(out + 2 * c, &v, 2);
  }
}

// ------------------------------------------------------------------ bulk reductions
// cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32, at the latest moments the PTX
// ISA allows: the source is read only when a cp.async.bulk.wait_group.read of the issuing
// thread covers the group (shared memory rewritten before that wait changes the result),
// and the sums land in global memory only at a cp.async.bulk.wait_group (no .read) that
// covers it, or else when the block exits (so another block that reads or adds to the same
// memory after a mere .read wait of this one sees the sums late). A thread that exits with
// a group not waited for is an error (its shared memory would be released under a pending
// read).

inline BulkGroups& bulk_of_current() {
  State& s = st();
  return hs().bulk[static_cast<size_t>(s.cur - s.fibers.data())];
}

inline void bulk_reduce_add(float* gdst, const void* ssrc, int bytes) {
  if (bytes <= 0 || bytes % 16 != 0) fail("cp.reduce.async.bulk: size not a positive multiple of 16");
  if (reinterpret_cast<uintptr_t>(gdst) % 16 != 0)
    fail("cp.reduce.async.bulk: global destination not 16-byte aligned");
  const uint32_t src = smem_off(ssrc, static_cast<size_t>(bytes), "cp.reduce.async.bulk source");
  if (src % 16 != 0) fail("cp.reduce.async.bulk: shared source not 16-byte aligned");
  bulk_of_current().open.push_back(BulkReduce{gdst, src, bytes});
}

inline void bulk_commit() {
  BulkGroups& b = bulk_of_current();
  b.groups.push_back(std::move(b.open));
  b.open.clear();
}

inline void bulk_read_groups(BulkGroups& b, int n) {
  while (b.groups.size() > static_cast<size_t>(n)) {
    for (const BulkReduce& r : b.groups.front()) {
      BulkSum sum{r.dst, std::vector<float>(static_cast<size_t>(r.bytes / 4))};
      memcpy(sum.add.data(), st().smem + r.src, static_cast<size_t>(r.bytes));
      b.read.push_back(std::move(sum));
    }
    b.groups.pop_front();
  }
}

inline void bulk_land(BulkGroups& b) {
  for (const BulkSum& sum : b.read)
    for (size_t i = 0; i < sum.add.size(); ++i) sum.dst[i] += sum.add[i];
  b.read.clear();
}

inline void bulk_wait_read(int n) { bulk_read_groups(bulk_of_current(), n); }

// wait_group N: every group but the newest N complete, its sums in global memory (the read
// groups are all older than the pending ones: they land too).
inline void bulk_wait(int n) {
  BulkGroups& b = bulk_of_current();
  bulk_read_groups(b, n);
  bulk_land(b);
}

// At a thread's exit: every bulk group must have been waited for.
inline void hopper_thread_exit() {
  State& s = st();
  if (hs().bulk.empty()) return;
  const BulkGroups& b = bulk_of_current();
  if (!b.open.empty() || !b.groups.empty())
    fail("thread " + std::to_string(s.cur - s.fibers.data()) +
         " exited with cp.reduce.async.bulk not covered by cp.async.bulk.wait_group.read " +
         "(uncommitted or not waited for)");
}

// When the block's last thread has exited (outside any thread): the sums still in flight
// land, thread by thread; a named barrier left with arrivals of a phase that never
// completed is an error (the two sides of a handshake disagree on its count).
inline void hopper_block_exit() {
  for (BulkGroups& b : hs().bulk) bulk_land(b);
  for (int id = 0; id < 16; ++id)
    if (hs().named[id].arrived != 0 && lc().error.empty())
      lc().error = "named barrier " + std::to_string(id) + ": " + std::to_string(hs().named[id].arrived) +
                   " of " + std::to_string(hs().named[id].expected) +
                   " threads arrived and the block exited";
}

// ------------------------------------------------------------------ named barriers
inline void named_bar(int id, int n, bool wait) {
  if (id < 0 || id > 15) fail("bar: barrier id " + std::to_string(id) + " outside 0..15");
  if (n <= 0 || n % 32 != 0 || n > st().nthreads)
    fail("bar: thread count " + std::to_string(n) + " not a positive multiple of 32 within the block");
  NamedBar& b = hs().named[id];
  if (b.arrived == 0) {
    b.expected = n;
  } else if (b.expected != n) {
    fail("bar " + std::to_string(id) + ": arrivals with thread counts " + std::to_string(b.expected) +
         " and " + std::to_string(n));
  }
  const uint64_t gen = b.gen;
  if (++b.arrived == n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  if (!wait) return;
  Fiber& f = *st().cur;
  f.wait = 7;
  f.wait_key = static_cast<uint32_t>(id);
  f.wait_gen = gen;
  yield();
}

inline bool hopper_runnable(const Fiber& f) {
  if (f.wait == 4) return hs().wgs[f.wait_key].gen != f.wait_gen;
  if (f.wait == 7) return hs().named[f.wait_key].gen != f.wait_gen;
  if (f.wait == 5) {
    auto it = hs().bars.find(f.wait_key);
    if (it == hs().bars.end() || it->second.phase != f.wait_gen) return true;
    for (const BulkCopy& c : hs().copies)  // a pending copy can complete it
      if (c.bar == f.wait_key) return true;
    return false;
  }
  return true;
}

}  // namespace emu
}  // namespace rk
