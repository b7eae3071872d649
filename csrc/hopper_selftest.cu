// Self-test kernels of the Hopper primitives (csrc/hopper.cuh) and the host-side tensor-map
// builder. tests/test_cuda_emulator_hopper.py runs them through the emulator against a
// direct computation; on an H100/H200 the same launcher runs the real instructions.
//
// One block of 256 threads: warpgroup 1 is the producer (setmaxnreg.dec 40; thread 128
// issues the TMA loads of A (rows_a x 64) and B (rows_b x 64) with an mbarrier expect_tx),
// warpgroup 0 the consumer (setmaxnreg.inc 232) computing D (64 x N, f32) = A B^T by four
// k16 wgmma steps. A / B land K-major in shared memory in chunks of `swizzle` bytes per row
// (16 = no swizzle: 8x16-byte core matrices), zero-filled past rows_a / rows_b.
// mode 0: A and B from descriptors; 1: A from registers (read from global in the mma
// fragment layout); 2: two commit groups D1, D2, then wait_group 1: out = D1, out2 = D2 as
// read before their wait (the emulator must give NaN); 3: the consumer skips the mbarrier
// wait (the emulator must give NaN: the copies have not landed); 4 (emulator only):
// setmaxnreg with a count that is not a multiple of 8 (must raise); 5: a two-phase ring:
// out = D, the consumers arrive on an "empty" mbarrier (count 128), the producer waits on
// it (parity 0) and reloads A shifted down by 8 rows (TMA zero fill at negative rows), the
// consumers wait on the full barrier with parity 1: out2 = D of the shifted A; 6 (emulator
// only): wgmma.mma_async without a wgmma.fence (must raise); 7: mode 0 with B loaded by 3D
// TMA (B viewed as (128 / W chunks, rows_b, W / 2 elements), strides W and 128 bytes).
// flag_selftest_kernel: blocks taking turns on a global counter (flag_wait_ge, then
// flag_release_add), recording the order; the emulator runs it with RECON_EMU_BLOCKS
// resident blocks, newest first.
#include "hopper.cuh"

#ifndef RECON_EMULATE
#include <cudaTypedefs.h>
#endif

namespace rk {

struct SelftestParams {
  TmaDesc ta[8], tb[8], tb3;
  const uint16_t* a;
  float* out;
  float* out2;
  int mode, rows_a, swz;
};

constexpr int kChunkRegion = 1024;

template <class T, int N>
__global__ void __launch_bounds__(256, 1) hopper_selftest_kernel(const __grid_constant__ SelftestParams p) {
#if RK_SM90_DEVICE || defined(RECON_EMULATE)
  unsigned char* smem = smem_base();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);  // "full"
  uint64_t* empty = bar + 1;
  unsigned char* sa = smem + kChunkRegion;
  unsigned char* sb = sa + 64 * 128;
  const int tid = static_cast<int>(threadIdx.x);
  const int W = p.swz == 0 ? 16 : p.swz;
  const int chunks = 128 / W;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_init(empty, 128);
    mbar_fence_init();
  }
  __syncthreads();
  if (tid >= 128) {  // producer warpgroup
    setmaxnreg_dec<40>();
    if (tid == 128) {
      for (int phase = 0; phase < (p.mode == 5 ? 2 : 1); ++phase) {
        if (phase == 1) mbar_wait(empty, 0);  // the consumers are done with phase 0
        mbar_arrive_expect_tx(bar, (64 + N) * 128);
        for (int c = 0; c < chunks; ++c) {  // phase 1: A shifted down 8 rows (zero fill)
          tma_load_2d(sa + c * 64 * W, &p.ta[c], bar, c * W / 2, phase == 1 ? -8 : 0);
          if (p.mode == 7)  // B as a 3D tensor (W/2, rows_b, 128/W): chunk c at z = c
            tma_load_3d(sb + c * N * W, &p.tb3, bar, 0, 0, c);
          else
            tma_load_2d(sb + c * N * W, &p.tb[c], bar, c * W / 2, 0);
        }
      }
    }
    return;
  }
#ifdef RECON_EMULATE
  if (p.mode == 4) setmaxnreg_inc<236>();
  if (p.mode == 6) {  // wgmma.mma_async without wgmma.fence: must raise
    float e[N / 2];
    wgmma_ss<T, N>(e, 0, 0, 0);
  }
#endif
  setmaxnreg_inc<232>();
  if (p.mode != 3) mbar_wait(bar, 0);
  auto desc = [&](unsigned char* base, int rows, int kk) {
    const int kb = kk * 32;
    if (p.swz == 0) return make_desc(base + 2 * kk * rows * 16, rows * 16, 128, 0);
    return make_desc(base + (kb / W) * rows * W + kb % W, 16, 8 * W, W);
  };
  float d[N / 2], d2[N / 2];
  const int w = tid / 32, l = tid % 32;
  wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    if (p.mode == 1) {
      uint32_t a[4];
      for (int i = 0; i < 4; ++i) {
        const int r = 16 * w + l / 4 + 8 * (i % 2), k = 16 * kk + 2 * (l % 4) + 8 * (i / 2);
        const uint32_t lo = r < p.rows_a ? p.a[r * 64 + k] : 0;
        const uint32_t hi = r < p.rows_a ? p.a[r * 64 + k + 1] : 0;
        a[i] = lo | (hi << 16);
      }
      wgmma_rs<T, N>(d, a, desc(sb, N, kk), kk > 0);
    } else {
      wgmma_ss<T, N>(d, desc(sa, 64, kk), desc(sb, N, kk), kk > 0);
    }
  }
  wgmma_commit();
  if (p.mode == 2) {
    for (int kk = 0; kk < 4; ++kk) wgmma_ss<T, N>(d2, desc(sa, 64, kk), desc(sb, N, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<1>();
  } else {
    wgmma_wait<0>();
  }
  if (p.mode == 5) {  // second phase of the ring: release the buffers, wait for parity 1
    mbar_arrive(empty);
    mbar_wait(bar, 1);
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) wgmma_ss<T, N>(d2, desc(sa, 64, kk), desc(sb, N, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
  }
  const int r0 = 16 * w + l / 4;
  for (int i = 0; i < N / 2; ++i) {
    const int j = i / 4, e = i % 4;
    const int r = r0 + 8 * (e / 2), c = 8 * j + 2 * (l % 4) + (e % 2);
    p.out[r * N + c] = d[i];
    if (p.mode == 2 || p.mode == 5) p.out2[r * N + c] = d2[i];
  }
  if (p.mode == 2) wgmma_wait<0>();
#endif
}

std::string make_tma_desc(TmaDesc* out, const void* base, int rank, const int64_t* dims,
                          const int64_t* strides_bytes, const int* box, int swizzle_bytes) {
  if (rank < 2 || rank > 4) return "tensor map rank: expected 2, 3 or 4, got " + std::to_string(rank);
  if (swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128)
    return "tensor map swizzle: expected 0, 32, 64 or 128 bytes, got " +
           std::to_string(swizzle_bytes);
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "tensor map base: not 16-byte aligned";
  const int inner_bytes = box[0] * 2;
  if (inner_bytes % 16 != 0 || (swizzle_bytes != 0 && inner_bytes > swizzle_bytes))
    return "tensor map box[0]: " + std::to_string(box[0]) +
           " elements: need a multiple of 16 bytes, at most the swizzle span";
  for (int i = 0; i < rank; ++i)
    if (box[i] < 1 || box[i] > 256 || dims[i] < 1)
      return "tensor map dim " + std::to_string(i) + ": expected box in [1, 256] and size >= 1, got box " +
             std::to_string(box[i]) + ", size " + std::to_string(dims[i]);
  for (int i = 1; i < rank; ++i)
    if (strides_bytes[i - 1] % 16 != 0 || strides_bytes[i - 1] <= 0 ||
        strides_bytes[i - 1] >= (int64_t(1) << 40))
      return "tensor map stride " + std::to_string(i) + ": expected a positive multiple of 16 bytes below 2^40, got " +
             std::to_string(strides_bytes[i - 1]);
#ifdef RECON_EMULATE
  TmaDesc d;
  d.base = static_cast<const unsigned char*>(base);
  d.rank = rank;
  d.esize = 2;
  d.strides[0] = 2;
  for (int i = 0; i < rank; ++i) {
    d.dims[i] = dims[i];
    d.box[i] = box[i];
    if (i > 0) d.strides[i] = strides_bytes[i - 1];
  }
  d.swizzle = swizzle_bytes;
  *out = d;
  return "";
#else
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (!encode) {
    cudaDriverEntryPointQueryResult q;
    void* fn = nullptr;
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !fn)
      return "cuTensorMapEncodeTiled: not found through cudaGetDriverEntryPointByVersion";
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  cuuint64_t gdim[4], gstride[3];
  cuuint32_t bdim[4], estride[4] = {1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    gdim[i] = static_cast<cuuint64_t>(dims[i]);
    bdim[i] = static_cast<cuuint32_t>(box[i]);
    if (i > 0) gstride[i - 1] = static_cast<cuuint64_t>(strides_bytes[i - 1]);
  }
  const CUtensorMapSwizzle sw = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                : swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                      : CU_TENSOR_MAP_SWIZZLE_NONE;
  const CUresult r = encode(out, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, static_cast<cuuint32_t>(rank),
                            const_cast<void*>(base), gdim, gstride, bdim, estride,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(r);
  return "";
#endif
}

#ifndef RECON_EMULATE
// "" on a usable compute capability 9.x device, else "<who>: why not".
static std::string sm90_device_error(const char* who) {
  std::string dev = device_status();
  if (!dev.empty()) return std::string(who) + ": " + dev;
  int dev_id = 0, major = 0;
  cudaGetDevice(&dev_id);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev_id);
  if (major != 9) return std::string(who) + ": needs a compute capability 9.x GPU, got " + std::to_string(major);
  return "";
}
#endif

struct FlagSelftestParams {
  int* counter;
  int* order;
  int blocks;
  bool reverse;
};

__global__ void __launch_bounds__(32) flag_selftest_kernel(const FlagSelftestParams p) {
#if RK_SM90_DEVICE || defined(RECON_EMULATE)
  const int b = static_cast<int>(blockIdx.x), turn = p.reverse ? p.blocks - 1 - b : b;
  flag_wait_ge(p.counter, turn);  // (the whole warp)
  if (threadIdx.x == 0) {
    p.order[turn] = b;
    flag_release_add(p.counter, 1);  // (release: the store above is seen before the turn)
  }
#endif
}

std::string flag_selftest(uint64_t counter, uint64_t order, int blocks, bool reverse) {
  if (blocks < 1 || blocks > 4096) return "blocks: expected 1..4096, got " + std::to_string(blocks);
  if (counter == 0 || counter % 4 != 0 || order == 0 || order % 4 != 0)
    return "counter / order: expected 4-byte aligned int32 pointers";
#ifndef RECON_EMULATE
  if (reverse) return "reverse: emulator only (a block would wait for one that may not be resident)";
  std::string dev = sm90_device_error("flag_selftest");
  if (!dev.empty()) return dev;
#endif
  const FlagSelftestParams p{reinterpret_cast<int*>(counter), reinterpret_cast<int*>(order), blocks, reverse};
  return launch(flag_selftest_kernel, "flag_selftest_kernel", dim3(static_cast<unsigned>(blocks)), dim3(32), 0, 0, p);
}

std::string hopper_selftest(int mode, int dtype, int n, int swizzle, uint64_t a, int rows_a,
                            uint64_t b, int rows_b, uint64_t out, uint64_t out2) {
  if (mode < 0 || mode > 7) return "mode: expected 0..7, got " + std::to_string(mode);
  if (n != 16 && n != 64) return "n: expected 16 or 64, got " + std::to_string(n);
  if (rows_a < 1 || rows_a > 64) return "rows_a: expected 1..64, got " + std::to_string(rows_a);
  if (rows_b < 1 || rows_b > n)
    return "rows_b: expected 1.." + std::to_string(n) + ", got " + std::to_string(rows_b);
#ifndef RECON_EMULATE
  if (mode == 4 || mode == 6) return "modes 4 and 6 are emulator-only (invalid programs)";
  std::string dev = sm90_device_error("hopper_selftest");
  if (!dev.empty()) return dev;
#endif
  SelftestParams p{};
  const int W = swizzle == 0 ? 16 : swizzle;
  if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128)
    return "swizzle: expected 0, 32, 64 or 128, got " + std::to_string(swizzle);
  for (int c = 0; c < 128 / W; ++c) {
    const int64_t da[2] = {64, rows_a}, db[2] = {64, rows_b}, st[1] = {128};
    const int ba[2] = {W / 2, 64}, bb[2] = {W / 2, n};
    std::string e = make_tma_desc(&p.ta[c], reinterpret_cast<const void*>(a), 2, da, st, ba, swizzle);
    if (e.empty()) e = make_tma_desc(&p.tb[c], reinterpret_cast<const void*>(b), 2, db, st, bb, swizzle);
    if (!e.empty()) return e;
  }
  {
    const int64_t d3[3] = {W / 2, rows_b, 128 / W}, st3[2] = {128, W};
    const int b3[3] = {W / 2, n, 1};
    std::string e = make_tma_desc(&p.tb3, reinterpret_cast<const void*>(b), 3, d3, st3, b3, swizzle);
    if (!e.empty()) return e;
  }
  p.a = reinterpret_cast<const uint16_t*>(a);
  p.out = reinterpret_cast<float*>(out);
  p.out2 = reinterpret_cast<float*>(out2);
  p.mode = mode;
  p.rows_a = rows_a;
  p.swz = swizzle;
  const size_t smem = kChunkRegion + (64 + n) * 128;
  auto go = [&](auto kernel) {
    return launch(kernel, "hopper_selftest_kernel", dim3(1), dim3(256), smem, 0, p);
  };
  if (dtype == kFloat16) return n == 16 ? go(hopper_selftest_kernel<__half, 16>) : go(hopper_selftest_kernel<__half, 64>);
  if (dtype == kBFloat16)
    return n == 16 ? go(hopper_selftest_kernel<__nv_bfloat16, 16>) : go(hopper_selftest_kernel<__nv_bfloat16, 64>);
  return "dtype code: expected 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype);
}

}  // namespace rk
