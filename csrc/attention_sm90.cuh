// Shared by the sm_90a attention kernels (attention_fwd_sm90.cu, attention_bwd_sm90.cu):
// the 4D tensor maps of the (B, H, N, D) operands.
#pragma once

#include "attention_common.cuh"
#include "hopper.cuh"

namespace rk {

// The byte strides of a (D, N, H, B) tensor map. Size-1 dims carry stride 0 (launchers.h:
// any stride is valid there); TMA wants a positive one, never used: the extent below.
inline void tma_strides(int64_t (&out)[3], const int64_t (&dims)[4], int64_t sm, int64_t sh, int64_t sb) {
  const int64_t st[3] = {sm * 2, sh * 2, sb * 2};
  int64_t extent = dims[0] * 2;
  for (int i = 0; i < 3; ++i) {
    out[i] = dims[i + 1] == 1 ? (extent + 15) / 16 * 16 : st[i];
    extent = out[i] * dims[i + 1];
  }
}

// Whether a 16-bit (B, H, n, D) operand with these element strides has a tensor map.
inline bool tma_describable(const AttnArgs& a, int64_t n, int64_t sm, int64_t sh, int64_t sb) {
  const int64_t dims[4] = {a.d, n, a.h, a.b};
  int64_t out[3];
  tma_strides(out, dims, sm, sh, sb);
  for (int64_t x : out)
    if (x <= 0 || x % 16 != 0 || x >= (int64_t(1) << 40)) return false;
  return true;
}

// The 4D map (D, n, H, B) of a 16-bit operand: box (64, rows, 1, 1), 128-byte swizzle (the
// wgmma atom), zero fill past n and D.
inline std::string make_attn_tma(TmaDesc* out, const AttnArgs& a, uint64_t ptr, int64_t n, int64_t sm,
                                 int64_t sh, int64_t sb, int rows) {
  const int64_t dims[4] = {a.d, n, a.h, a.b};
  int64_t strides[3];
  tma_strides(strides, dims, sm, sh, sb);
  const int box[4] = {64, rows, 1, 1};
  return make_tma_desc(out, reinterpret_cast<const void*>(ptr), 4, dims, strides, box, 128);
}

// The tensor maps of a launch: each operand's 4D map, or "<who> <name>: <why>".
struct TmaOperand {
  TmaDesc* out;
  uint64_t ptr;
  int64_t n, sm, sh, sb;
  int rows;
  const char* name;
};
template <size_t kN>
inline std::string make_attn_tmas(const char* who, const AttnArgs& a, const TmaOperand (&ops)[kN]) {
  for (const TmaOperand& op : ops) {
    std::string e = make_attn_tma(op.out, a, op.ptr, op.n, op.sm, op.sh, op.sb, op.rows);
    if (!e.empty()) return std::string(who) + " " + op.name + ": " + e;
  }
  return "";
}

// "sm90" or "sm80: <why>" for AttnArgs::path and what the arguments allow (why_not).
inline std::string sm90_choice(const AttnArgs& a, std::string why_not, const char* portable) {
  if (a.path == 1) return std::string("sm80: path = 1 asks for the portable ") + portable;
  if (a.path != 2 && why_not.empty()) why_not = sm90_unavailable();  // (2: the caller checks)
  return why_not.empty() ? "sm90" : "sm80: " + why_not;
}

template <class T>
struct TypeTag {
  using type = T;
};

// Calls go(TypeTag<T>, kD, kMask, kDrop) (std::integral_constant / bool_constant tags) for
// the dtype, head-dim bucket, masking and dropout of the arguments: the one dispatch of the
// sm_90a launchers.
template <class F>
inline std::string dispatch_sm90(const AttnArgs& a, F&& go) {
  const bool masked = a.mask != 0 || a.kpm != 0 || a.causal, drop = a.drop_threshold != 0;
  auto variants = [&](auto t, auto kd) -> std::string {
    if (masked)
      return drop ? go(t, kd, std::true_type{}, std::true_type{}) : go(t, kd, std::true_type{}, std::false_type{});
    return drop ? go(t, kd, std::false_type{}, std::true_type{}) : go(t, kd, std::false_type{}, std::false_type{});
  };
  if (a.dtype == kFloat16) {
    RK_DISPATCH_HEAD_DIM(a.d, kD, return variants(TypeTag<__half>{}, std::integral_constant<int, kD>{});)
  }
  RK_DISPATCH_HEAD_DIM(a.d, kD, return variants(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, kD>{});)
}

}  // namespace rk
