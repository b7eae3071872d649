// Hopper (sm_90a) primitives: wgmma, TMA (cp.async.bulk.tensor), mbarrier, setmaxnreg,
// as hand-written PTX wrappers (no CUTLASS: the emulator replaces each wrapper by a model of
// its PTX ISA semantics, csrc/emulator_hopper.h, which a CuTe/CUTLASS header would make
// impossible; and the GPU image cannot install packages).
//
// The PTX only exists in the sm_90a device pass (RK_SM90_DEVICE); in the host pass and the
// sm_80 pass the wrappers compile to a trap so that one source builds for every target;
// the launchers only pick an sm_90a kernel on a capability 9.0 device (see the kernels).
//
// Operand conventions (the emulator checks them, see emulator_hopper.h):
//   * matrix descriptors: K-major operands only (imm-trans-a = imm-trans-b = 0);
//     make_desc(smem_ptr, lbo_bytes, sbo_bytes, swizzle_bytes in {0, 32, 64, 128});
//   * A from registers: the mma.m16n8k16 A fragment of warp w covering rows 16w..16w+15;
//   * accumulators: float d[N / 2], the m64nN f32 fragment (emulator_hopper.h lists it).
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RK_SM90_DEVICE 1
#else
#define RK_SM90_DEVICE 0
#endif

#ifdef RECON_EMULATE
#ifndef __grid_constant__
#define __grid_constant__
#endif
#else
#include <cuda.h>  // CUtensorMap and its enums only: the driver is reached through cudart
#endif

namespace rk {

#ifdef RECON_EMULATE
using TmaDesc = ::rk::emu::TmaDesc;
#else
using TmaDesc = CUtensorMap;
#endif

// Host: a 2D or 3D tile-mode tensor map of 16-bit elements (dims / box innermost first,
// strides in bytes of dims 1 and 2). Returns "" or the error.
std::string make_tma_desc(TmaDesc* out, const void* base, int rank, const int64_t* dims,
                          const int64_t* strides_bytes, const int* box, int swizzle_bytes);

// Matrix descriptor of a K-major operand (see the PTX ISA, "Matrix Descriptor Format").
__host__ __device__ inline uint64_t desc_encode(uint32_t smem_addr, uint32_t lbo, uint32_t sbo, int swizzle_bytes) {
  const uint64_t mode = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 3 : 0;
  return (static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4)) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (mode << 62);
}

template <class T>
struct Tag {};
template <int N>
struct IntTag {};

#ifdef RECON_EMULATE

inline uint64_t make_desc(const void* p, uint32_t lbo, uint32_t sbo, int swizzle_bytes) {
  return desc_encode(::rk::emu::smem_off(p, 16, "wgmma descriptor"), lbo, sbo, swizzle_bytes);
}
inline void wgmma_fence() { ::rk::emu::wgmma_fence(); }
inline void wgmma_commit() { ::rk::emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() { ::rk::emu::wgmma_wait<N>(); }
template <class T>
constexpr int dtype_code_of() { return std::is_same<T, __half>::value ? 1 : 2; }
template <class T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  ::rk::emu::wgmma_issue(N, dtype_code_of<T>(), d, nullptr, da, db, scale_d);
}
template <class T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  ::rk::emu::wgmma_issue(N, dtype_code_of<T>(), d, a, 0, db, scale_d);
}
inline void mbar_init(uint64_t* b, int count) { ::rk::emu::mbar_init(b, count); }
inline void mbar_fence_init() {}
inline void mbar_arrive(uint64_t* b) { ::rk::emu::mbar_arrive(b); }
inline void mbar_arrive_expect_tx(uint64_t* b, int bytes) { ::rk::emu::mbar_arrive_expect_tx(b, bytes); }
inline void mbar_wait(uint64_t* b, int parity) { ::rk::emu::mbar_wait(b, parity); }
inline void tma_load_2d(void* dst, const TmaDesc* d, uint64_t* bar, int c0, int c1) {
  ::rk::emu::tma_load(dst, *d, bar, c0, c1, 0);
}
inline void tma_load_3d(void* dst, const TmaDesc* d, uint64_t* bar, int c0, int c1, int c2) {
  ::rk::emu::tma_load(dst, *d, bar, c0, c1, c2);
}
template <int kCount>
inline void setmaxnreg_inc() { ::rk::emu::setmaxnreg<true>(kCount); }
template <int kCount>
inline void setmaxnreg_dec() { ::rk::emu::setmaxnreg<false>(kCount); }

#else  // GPU

RK_DEVICE uint64_t make_desc(const void* p, uint32_t lbo, uint32_t sbo, int swizzle_bytes) {
  return desc_encode(smem_u32(p), lbo, sbo, swizzle_bytes);
}

#if RK_SM90_DEVICE
RK_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
RK_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
RK_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
RK_DEVICE void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
RK_DEVICE void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
RK_DEVICE void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
RK_DEVICE void mbar_arrive_expect_tx(uint64_t* b, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)),
               "r"(bytes)
               : "memory");
}
RK_DEVICE void mbar_wait(uint64_t* b, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
RK_DEVICE void tma_load_2d(void* dst, const TmaDesc* d, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(d)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}
RK_DEVICE void tma_load_3d(void* dst, const TmaDesc* d, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(d)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
template <int kCount>
RK_DEVICE void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kCount));
}
template <int kCount>
RK_DEVICE void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kCount));
}

RK_DEVICE void wgmma_ss_impl(float* d, uint64_t da, uint64_t db, int scale_d, Tag<__half>, IntTag<16>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "%8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_rs_impl(float* d, const uint32_t* a, uint64_t db, int scale_d, Tag<__half>, IntTag<16>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_ss_impl(float* d, uint64_t da, uint64_t db, int scale_d, Tag<__nv_bfloat16>, IntTag<16>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "%8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_rs_impl(float* d, const uint32_t* a, uint64_t db, int scale_d, Tag<__nv_bfloat16>, IntTag<16>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_ss_impl(float* d, uint64_t da, uint64_t db, int scale_d, Tag<__half>, IntTag<64>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_rs_impl(float* d, const uint32_t* a, uint64_t db, int scale_d, Tag<__half>, IntTag<64>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_ss_impl(float* d, uint64_t da, uint64_t db, int scale_d, Tag<__nv_bfloat16>, IntTag<64>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}
RK_DEVICE void wgmma_rs_impl(float* d, const uint32_t* a, uint64_t db, int scale_d, Tag<__nv_bfloat16>, IntTag<64>) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}

template <class T, int N>
RK_DEVICE void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  wgmma_ss_impl(d, da, db, scale_d, Tag<T>(), IntTag<N>());
}
template <class T, int N>
RK_DEVICE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  wgmma_rs_impl(d, a, db, scale_d, Tag<T>(), IntTag<N>());
}

#else  // not the sm_90a device pass: never executed (the launchers check the device)

RK_DEVICE void wgmma_fence() { __trap(); }
RK_DEVICE void wgmma_commit() { __trap(); }
template <int N>
RK_DEVICE void wgmma_wait() { __trap(); }
RK_DEVICE void mbar_init(uint64_t*, int) { __trap(); }
RK_DEVICE void mbar_fence_init() { __trap(); }
RK_DEVICE void mbar_arrive(uint64_t*) { __trap(); }
RK_DEVICE void mbar_arrive_expect_tx(uint64_t*, int) { __trap(); }
RK_DEVICE void mbar_wait(uint64_t*, int) { __trap(); }
RK_DEVICE void tma_load_2d(void*, const TmaDesc*, uint64_t*, int, int) { __trap(); }
RK_DEVICE void tma_load_3d(void*, const TmaDesc*, uint64_t*, int, int, int) { __trap(); }
template <int kCount>
RK_DEVICE void setmaxnreg_inc() { __trap(); }
template <int kCount>
RK_DEVICE void setmaxnreg_dec() { __trap(); }
template <class T, int N>
RK_DEVICE void wgmma_ss(float (&)[N / 2], uint64_t, uint64_t, int) { __trap(); }
template <class T, int N>
RK_DEVICE void wgmma_rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) { __trap(); }

#endif  // RK_SM90_DEVICE
#endif  // RECON_EMULATE

}  // namespace rk
