// A CPU emulator for the kernels in this directory (RECON_EMULATE builds only; the GPU
// extension never includes it). It exists to check, on a machine without a GPU, the index
// math that cannot be tested otherwise: fragment layouts, tile offsets, masks, pipelines.
//
// Every CUDA thread of a block runs as a fiber (ucontext) on one OS thread; blocks run one
// after another, or RECON_EMU_BLOCKS of them resident at once, newest first (launch()). __syncthreads and the warp-collective primitives (ldmatrix, mma.sync,
// shfl, __syncwarp) switch fibers until all participants arrive, then compute each lane's
// result from the PTX ISA definitions, independently of the kernels' own index math:
//   * ldmatrix: lane l supplies the address of row l % 8 of matrix l / 8; without .trans
//     lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each matrix, with
//     .trans the transposed matrix's elements at those coordinates;
//   * mma.m16n8k16: A/B/C fragments as listed in common.cuh, computed as a 16x8x16 product.
// Deliberately unforgiving: shared memory starts as 0xFF bytes (NaN in every float type),
// cp.async copies land only at the cp.async.wait_group that covers them (a missing wait
// reads stale data), a warp whose lanes reach different collectives or a block whose
// threads never meet at a barrier is reported as an error, and every ldmatrix / cp.async
// address is checked for alignment and shared-memory bounds. Launch limits are the
// smallest of the targeted GPUs (sm_80: 163 KiB of shared memory per block). The Hopper
// primitives (wgmma, TMA, mbarrier, setmaxnreg; warpgroups of 128 threads) are modeled in
// emulator_hopper.h, included below.
#pragma once

#ifndef RECON_EMULATE
#error "emulator.h is only for RECON_EMULATE builds"
#endif

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#define __launch_bounds__(...)

using std::max;
using std::min;

namespace rk {
namespace emu {

constexpr size_t kMaxSmem = 166912;  // sm_80 opt-in limit per block
constexpr size_t kStackBytes = 512 * 1024;

enum Op : int { kOpShfl = 1, kOpSyncwarp, kOpLdsm, kOpLdsmT, kOpMma, kOpStsm, kOpStsmT, kOpVote };

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 tidx;
  int lane = 0, warp = 0;
  bool done = false;
  // 0 runnable, 1 block barrier, 2 warp collective, 4 warpgroup, 5 mbarrier, 6 global flag,
  // 7 named barrier
  int wait = 0;
  uint64_t wait_gen = 0;
  uint32_t wait_key = 0;  // warpgroup / mbarrier offset (emulator_hopper.h)
  const volatile int* wait_flag = nullptr;  // wait 6: until *wait_flag >= wait_key
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  int op = 0;
  alignas(16) unsigned char slots[2][32][64];
};

// One resident block: its threads, warps, shared memory and barrier state. A launch keeps
// RECON_EMU_BLOCKS of them resident (default 1, see launch()).
struct State {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  size_t smem_cap = 0;
  dim3 block_idx, grid, block;
  int64_t linear = -1;  // blockIdx in launch order; -1: slot empty
  int slot = 0;
  int nthreads = 0;
  int arrived = 0;
  uint64_t gen = 0;
  ucontext_t sched;
  Fiber* cur = nullptr;
};

// What a launch shares across its resident blocks: the kernel body and the first error.
struct Launch {
  std::string error;
  std::function<void()> body;
};

inline Launch& lc() {
  static Launch l;
  return l;
}

inline std::vector<std::unique_ptr<State>>& slots() {
  static std::vector<std::unique_ptr<State>> v;
  return v;
}

inline State*& cur_state() {
  static State* s = nullptr;
  return s;
}

// The block whose thread runs now.
inline State& st() { return *cur_state(); }

inline void yield() { swapcontext(&st().cur->ctx, &st().sched); }

// Records the first error and parks the fiber for good (the scheduler stops the launch).
[[noreturn]] inline void fail(const std::string& msg) {
  if (lc().error.empty()) lc().error = msg;
  for (;;) yield();
}

inline void syncthreads() {
  State& s = st();
  const uint64_t g = s.gen;
  if (++s.arrived == s.nthreads) {
    s.arrived = 0;
    ++s.gen;
  } else {
    s.cur->wait = 1;
    s.cur->wait_gen = g;
    yield();
  }
}

// Deposits this lane's input and returns the 32 deposits (lane l at + l * 64) once every
// lane of the warp has arrived at the same collective. Slots alternate between two
// buffers: a lane can only get two collectives ahead after every lane has read this one.
template <class In>
inline const unsigned char* exchange(int op, const In& in) {
  static_assert(sizeof(In) <= 64, "collective payload too large");
  State& s = st();
  Fiber& f = *s.cur;
  Warp& w = s.warps[f.warp];
  const uint64_t g = w.gen;
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("warp " + std::to_string(f.warp) + ": lanes reached different warp collectives (" +
         std::to_string(w.op) + " vs " + std::to_string(op) + "): divergent .sync.aligned");
  }
  memcpy(w.slots[g & 1][f.lane], &in, sizeof(In));
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = 2;
    f.wait_gen = g;
    yield();
  }
  return &w.slots[g & 1][0][0];
}

template <class In>
inline In slot(const unsigned char* all, int lane) {
  In v;
  memcpy(&v, all + lane * 64, sizeof(In));
  return v;
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  State& s = st();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < s.smem || c + bytes > s.smem + s.smem_size)
    fail(std::string(what) + ": address outside the block's dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(c) % 16 != 0)
    fail(std::string(what) + ": shared address not 16-byte aligned");
}

inline unsigned char* smem_base() { return st().smem; }

inline float shfl_xor(float v, int lane_mask) {
  const unsigned char* all = exchange(kOpShfl, v);
  return slot<float>(all, st().cur->lane ^ lane_mask);
}

inline void syncwarp() { exchange(kOpSyncwarp, 0); }

// __shfl_sync(~0u, v, 0): lane 0's v to every lane (the callers pass the same value on
// every lane; a lane that does not shows up as a wrong result).
inline int warp_uniform(int v) {
  const unsigned char* all = exchange(kOpShfl, v);
  return slot<int>(all, 0);
}

inline uint16_t u16_at(const void* p, int element) {
  uint16_t v;
  memcpy(&v, static_cast<const unsigned char*>(p) + 2 * element, 2);
  return v;
}

inline void ldsm_impl(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p, 16, trans ? "ldmatrix.trans" : "ldmatrix");
  const unsigned char* all = exchange(trans ? kOpLdsmT : kOpLdsm, p);
  const int l = st().cur->lane;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const void* row = slot<const void*>(all, 8 * i + l / 4);
      lo = u16_at(row, 2 * (l % 4));
      hi = u16_at(row, 2 * (l % 4) + 1);
    } else {
      const void* row0 = slot<const void*>(all, 8 * i + 2 * (l % 4));
      const void* row1 = slot<const void*>(all, 8 * i + 2 * (l % 4) + 1);
      lo = u16_at(row0, l / 4);
      hi = u16_at(row1, l / 4);
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, true); }

template <class T>
inline float half_bits_to_float(uint16_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
}

template <class T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, float>::value) {
    fail("mma16816<float> called: fp32 must take the SIMT path");
  } else {
    struct In {
      uint32_t a[4];
      uint32_t b[2];
    } in;
    memcpy(in.a, a, sizeof(in.a));
    memcpy(in.b, b, sizeof(in.b));
    const unsigned char* all = exchange(kOpMma, in);
    // A[row][k]: register (row >= 8) + 2 (k >= 8) of lane (row % 8) * 4 + (k % 8) / 2,
    // half k % 2. B[k][col]: register (k >= 8) of lane col * 4 + (k % 8) / 2, half k % 2.
    auto A = [&](int row, int k) {
      const In v = slot<In>(all, (row % 8) * 4 + (k % 8) / 2);
      const uint32_t reg = v.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      return half_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k % 2))));
    };
    auto B = [&](int k, int col) {
      const In v = slot<In>(all, col * 4 + (k % 8) / 2);
      const uint32_t reg = v.b[k >= 8 ? 1 : 0];
      return half_bits_to_float<T>(static_cast<uint16_t>(reg >> (16 * (k % 2))));
    };
    const int l = st().cur->lane;
    for (int e = 0; e < 4; ++e) {
      const int row = l / 4 + 8 * (e / 2);
      const int col = 2 * (l % 4) + (e % 2);
      float acc = d[e];
      for (int k = 0; k < 16; ++k) acc = fmaf(A(row, k), B(k, col), acc);
      d[e] = acc;
    }
  }
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  check_smem(dst, 16, "cp.async destination");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size outside [0, 16]");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async: global source not 16-byte aligned");
  st().cur->open.push_back(
      {static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes});
}

inline void cp_async_commit() {
  Fiber& f = *st().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

template <int N>
inline void cp_async_wait() {
  Fiber& f = *st().cur;
  while (f.groups.size() > static_cast<size_t>(N)) {
    for (const Copy& c : f.groups.front()) {
      if (c.bytes > 0) memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
      memset(c.dst + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
    }
    f.groups.pop_front();
  }
}

}  // namespace emu
}  // namespace rk

#include "emulator_hopper.h"

namespace rk {
namespace emu {

inline void fiber_entry() {
  lc().body();
  hopper_thread_exit();
  st().cur->done = true;
  // returning resumes uc_link: the scheduler
}

inline bool runnable(const State& s, const Fiber& f) {
  if (f.done) return false;
  if (f.wait == 1) return s.gen != f.wait_gen;
  if (f.wait == 2) return s.warps[f.warp].gen != f.wait_gen;
  if (f.wait == 6) return *f.wait_flag >= static_cast<int>(f.wait_key);
  return hopper_runnable(f);
}

// Spins until *flag >= value (a global-memory counter other blocks advance), as the GPU
// version does: every lane of the warp reads the flag and the warp leaves on a vote
// (__all_sync), so all 32 lanes leave together; while the vote fails the lanes park until
// the flag reaches `value`. A launch whose every resident thread waits is a deadlock.
inline void wait_flag_ge(const volatile int* flag, int value) {
  for (;;) {
    const int seen = *flag >= value;
    const unsigned char* all = exchange(kOpVote, seen);
    bool every = true;
    for (int l = 0; l < 32; ++l) every = every && slot<int>(all, l) != 0;
    if (every) return;
    Fiber& f = *st().cur;
    if (*flag < value) {
      f.wait = 6;
      f.wait_flag = flag;
      f.wait_key = static_cast<uint32_t>(value);
      yield();
    }
  }
}

inline void start_block(State& s, int64_t linear) {
  const dim3 g = s.grid;
  s.linear = linear;
  s.block_idx = dim3(static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                     static_cast<unsigned>(linear / (int64_t(g.x) * g.y)));
  memset(s.smem, 0xFF, s.smem_size);  // NaN everywhere: reading unwritten smem shows up
  s.arrived = 0;
  s.gen = 0;
  cur_state() = &s;
  hopper_reset(s.nthreads);
  for (Warp& w : s.warps) {
    w.arrived = 0;
    w.gen = 0;
    w.op = 0;
  }
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    f.tidx = dim3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
    f.lane = i % 32;
    f.warp = i / 32;
    f.done = false;
    f.wait = 0;
    f.open.clear();
    f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
}

// One pass over a block's runnable threads: 2 when every thread has exited, 1 when one
// ran, 0 when none could (all wait).
inline int step_block(State& s) {
  cur_state() = &s;
  bool all_done = true, progressed = false;
  for (int i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    if (f.done) continue;
    all_done = false;
    if (!runnable(s, f)) continue;
    f.wait = 0;
    s.cur = &f;
    swapcontext(&s.sched, &f.ctx);
    progressed = true;
    if (!lc().error.empty()) return 1;
  }
  return all_done ? 2 : progressed ? 1 : 0;
}

inline std::string waits_of(const State& s) {
  int at_barrier = 0, at_warp = 0, at_wg = 0, at_bar = 0, at_flag = 0, at_named = 0, exited = 0;
  for (int i = 0; i < s.nthreads; ++i) {
    const Fiber& f = s.fibers[i];
    exited += f.done;
    at_barrier += !f.done && f.wait == 1;
    at_warp += !f.done && f.wait == 2;
    at_wg += !f.done && f.wait == 4;
    at_bar += !f.done && f.wait == 5;
    at_named += !f.done && f.wait == 7;
    at_flag += !f.done && f.wait == 6;
  }
  return std::to_string(at_barrier) + " threads at __syncthreads, " + std::to_string(at_warp) +
         " at a warp collective, " + std::to_string(at_wg) + " at a warpgroup collective, " +
         std::to_string(at_bar) + " waiting on an mbarrier, " +
         (at_flag ? std::to_string(at_flag) + " on a global flag, " : std::string()) +
         (at_named ? std::to_string(at_named) + " at a named barrier, " : std::string()) +
         std::to_string(exited) + " exited";
}

inline std::string block_name(const State& s) {
  return "block (" + std::to_string(s.block_idx.x) + ", " + std::to_string(s.block_idx.y) + ", " +
         std::to_string(s.block_idx.z) + ")";
}

// RECON_EMU_BLOCKS (default 1): blocks resident at once. With more than one the scheduler
// runs the newest resident block that can make progress first (blocks start in blockIdx
// order, as on the GPU, each into the first free slot): blocks that start together run in
// reverse order, so a kernel whose blocks depend on each other's global-memory writes
// without waiting for them (a flag, a semaphore) sees them late, and one that waits on an
// older block works only if that block still gets to run.
inline int resident_blocks() {
  const char* v = std::getenv("RECON_EMU_BLOCKS");
  if (v == nullptr || *v == 0) return 1;
  const int n = std::atoi(v);
  return n < 1 ? 1 : n > 64 ? 64 : n;
}

// The per-block shared-memory limit launches are checked against: sm_80's unless an sm_90a
// launcher raises it for its launch (SmemLimitSm90).
constexpr size_t kMaxSmemSm90 = 232448;  // 227 KiB: the sm_90 opt-in limit per block
inline size_t& smem_limit() {
  static size_t v = kMaxSmem;
  return v;
}
struct SmemLimitSm90 {
  size_t prev;
  SmemLimitSm90() : prev(smem_limit()) { smem_limit() = kMaxSmemSm90; }
  ~SmemLimitSm90() { smem_limit() = prev; }
};

inline std::map<std::string, int64_t>& launch_counts() {
  static std::map<std::string, int64_t> counts;
  return counts;
}

template <class P>
inline std::string launch(void (*kernel)(P), const char* name, dim3 grid, dim3 block,
                          size_t smem_bytes, const P& p) {
  ++launch_counts()[name];
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads < 1 || nthreads > 1024 || nthreads % 32 != 0)
    return std::string(name) + ": emulator: block of " + std::to_string(nthreads) +
           " threads (need a multiple of 32, at most 1024)";
  if (smem_bytes > smem_limit())
    return std::string(name) + ": emulator: " + std::to_string(smem_bytes) +
           " bytes of shared memory exceed the " + (smem_limit() == kMaxSmem ? "sm_80" : "sm_90") +
           " limit of " + std::to_string(smem_limit());
  const int64_t total = int64_t(grid.x) * grid.y * grid.z;
  const int resident = static_cast<int>(std::min<int64_t>(resident_blocks(), std::max<int64_t>(total, 1)));
  auto& all = slots();
  while (static_cast<int>(all.size()) < resident) {
    all.emplace_back(new State());
    all.back()->slot = static_cast<int>(all.size()) - 1;
  }
  for (int r = 0; r < resident; ++r) {
    State& s = *all[r];
    if (s.smem_cap < smem_bytes + 16) {
      std::free(s.smem);
      s.smem_cap = std::max<size_t>(smem_bytes + 16, 4096);
      s.smem = static_cast<unsigned char*>(std::aligned_alloc(1024, (s.smem_cap + 1023) / 1024 * 1024));
    }
    s.smem_size = smem_bytes;
    if (static_cast<int>(s.fibers.size()) < nthreads) {
      s.fibers.resize(nthreads);
      for (Fiber& f : s.fibers)
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
    }
    s.warps.assign(nthreads / 32, Warp());
    s.nthreads = nthreads;
    s.block = block;
    s.grid = grid;
    s.linear = -1;
  }
  Launch& l = lc();
  l.error.clear();
  l.body = [kernel, p]() { kernel(p); };
  int64_t next = 0;
  for (int r = 0; r < resident && next < total; ++r) start_block(*all[r], next++);
  auto failed = [&](const State& s) {
    return std::string(name) + ": emulator: " + block_name(s) + ": " + l.error;
  };
  for (;;) {
    // the newest resident block first; after any progress, look again from the newest
    State* order[64];
    int active = 0;
    for (int r = 0; r < resident; ++r)
      if (all[r]->linear >= 0) order[active++] = all[r].get();
    if (active == 0) break;
    std::sort(order, order + active, [](const State* a, const State* b) { return a->linear > b->linear; });
    bool progressed = false;
    for (int i = 0; i < active && !progressed; ++i) {
      State& s = *order[i];
      const int r = step_block(s);
      if (!l.error.empty()) return failed(s);
      if (r == 0) continue;
      progressed = true;
      if (r == 2) {
        cur_state() = &s;
        hopper_block_exit();
        if (!l.error.empty()) return failed(s);
        s.linear = -1;
        if (next < total) start_block(s, next++);
      }
    }
    if (!progressed) {
      std::string msg = std::string(name) + ": emulator: ";
      for (int i = active - 1; i >= 0; --i)
        msg += (i == active - 1 ? "" : "; ") + block_name(*order[i]) + ": " +
               (i == active - 1 ? "deadlock: " : "") + waits_of(*order[i]);
      return msg;
    }
  }
  return "";
}

}  // namespace emu
}  // namespace rk

#define threadIdx (::rk::emu::st().cur->tidx)
#define blockIdx (::rk::emu::st().block_idx)
#define blockDim (::rk::emu::st().block)
#define gridDim (::rk::emu::st().grid)

inline void __syncthreads() { ::rk::emu::syncthreads(); }

// Global-memory float atomics: the fibers of the emulator never interleave inside a call,
// so a plain read-modify-write is atomic here.
inline float atomicAdd(float* addr, float v) {
  const float old = *addr;
  *addr = old + v;
  return old;
}
