// lora_linear and merge_lora as fused GEMMs (see gemm.cu for the kernel).
//
// forward:  xa = x A^T                                  (M x r, saved for backward)
//           y = x W^T + b + s * xa B^T                  (rank-r term as a second K segment;
//                                                        W + s B A is never formed)
// backward: dyb = dy B                                  (M x r workspace)
//           dx = dy W + s * dyb A                       (second K segment again)
//           dA = s * dyb^T x, dB = s * dy^T xa, dW = dy^T x (only if needed), db = colsum(dy)
// merge:    W + s * B A                                 (residual epilogue)
#include "common.cuh"

namespace rk {

static std::string check_sizes(const char* what, const LoraArgs& a) {
  if (a.m < 1 || a.in < 1 || a.out < 1 || a.r < 1)
    return std::string(what) + ": expected M, in, out, r >= 1, got M=" + std::to_string(a.m) +
           " in=" + std::to_string(a.in) + " out=" + std::to_string(a.out) +
           " r=" + std::to_string(a.r);
  return "";
}

std::string lora_linear_fwd(const LoraArgs& a, uintptr_t stream) {
  std::string err = check_sizes("lora_linear_fwd", a);
  if (!err.empty()) return err;
  // xa = x A^T
  GemmArgs g = gemm_args(a.x, a.ldx, 0, a.la, a.ldla, 1, a.m, a.r, a.in, a.xa, a.ldxa, a.dtype);
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_fwd (x A^T): " + err;

  // y = x W^T + bias + s * xa B^T
  g = gemm_args(a.x, a.ldx, 0, a.w, a.ldw, 1, a.m, a.out, a.in, a.y, a.ldy, a.dtype);
  g.a2 = a.xa;
  g.lda2 = a.ldxa;
  g.b2 = a.lb;
  g.ldb2 = a.ldlb;
  g.k2 = a.r;
  g.alpha2 = a.scale;
  g.bias = a.bias;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_fwd (x W^T + s xa B^T): " + err;
  return "";
}

std::string lora_linear_bwd(const LoraArgs& a, uintptr_t stream) {
  std::string err = check_sizes("lora_linear_bwd", a);
  if (!err.empty()) return err;
  // dyb = dy B
  GemmArgs g =
      gemm_args(a.dy, a.lddy, 0, a.lb, a.ldlb, 0, a.m, a.r, a.out, a.dyb, a.lddyb, a.dtype);
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dy B): " + err;

  // dx = dy W + s * dyb A
  g = gemm_args(a.dy, a.lddy, 0, a.w, a.ldw, 0, a.m, a.in, a.out, a.dx, a.lddx, a.dtype);
  g.a2 = a.dyb;
  g.lda2 = a.lddyb;
  g.b2 = a.la;
  g.ldb2 = a.ldla;
  g.k2 = a.r;
  g.alpha2 = a.scale;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dx): " + err;

  // dA = s * dyb^T x
  g = gemm_args(a.dyb, a.lddyb, 1, a.x, a.ldx, 0, a.r, a.in, a.m, a.dla, a.lddla, a.dtype);
  g.alpha = a.scale;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dA): " + err;

  // dB = s * dy^T xa
  g = gemm_args(a.dy, a.lddy, 1, a.xa, a.ldxa, 0, a.out, a.r, a.m, a.dlb, a.lddlb, a.dtype);
  g.alpha = a.scale;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dB): " + err;

  if (a.dw != 0) {  // dW = dy^T x, only when the base weight is trained
    g = gemm_args(a.dy, a.lddy, 1, a.x, a.ldx, 0, a.out, a.in, a.m, a.dw, a.lddw, a.dtype);
    err = gemm(g, stream);
    if (!err.empty()) return "lora_linear_bwd (dW): " + err;
  }
  if (a.dbias != 0) {
    err = colsum(a.dy, a.lddy, a.m, a.out, a.dbias, a.dtype, stream);
    if (!err.empty()) return "lora_linear_bwd (dbias): " + err;
  }
  return "";
}

std::string merge_lora(const LoraArgs& a, uintptr_t stream) {
  if (a.in < 1 || a.out < 1 || a.r < 1) return "merge_lora: expected in, out, r >= 1";
  // y = W + s * B A
  GemmArgs g = gemm_args(a.lb, a.ldlb, 0, a.la, a.ldla, 0, a.out, a.in, a.r, a.y, a.ldy, a.dtype);
  g.alpha = a.scale;
  g.residual = a.w;
  g.ldr = a.ldw;
  std::string err = gemm(g, stream);
  if (!err.empty()) return "merge_lora: " + err;
  return "";
}

}  // namespace rk
