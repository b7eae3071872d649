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
  GemmArgs g;  // xa = x A^T
  g.a = a.x;
  g.lda = a.ldx;
  g.b = a.la;
  g.ldb = a.ldla;
  g.a_trans = 0;
  g.b_trans = 1;
  g.m = a.m;
  g.n = a.r;
  g.k = a.in;
  g.c = a.xa;
  g.ldc = a.ldxa;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_fwd (x A^T): " + err;

  g = GemmArgs();  // y = x W^T + bias + s * xa B^T
  g.a = a.x;
  g.lda = a.ldx;
  g.b = a.w;
  g.ldb = a.ldw;
  g.k = a.in;
  g.a2 = a.xa;
  g.lda2 = a.ldxa;
  g.b2 = a.lb;
  g.ldb2 = a.ldlb;
  g.k2 = a.r;
  g.alpha2 = a.scale;
  g.a_trans = 0;
  g.b_trans = 1;
  g.m = a.m;
  g.n = a.out;
  g.bias = a.bias;
  g.c = a.y;
  g.ldc = a.ldy;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_fwd (x W^T + s xa B^T): " + err;
  return "";
}

std::string lora_linear_bwd(const LoraArgs& a, uintptr_t stream) {
  std::string err = check_sizes("lora_linear_bwd", a);
  if (!err.empty()) return err;
  GemmArgs g;  // dyb = dy B
  g.a = a.dy;
  g.lda = a.lddy;
  g.b = a.lb;
  g.ldb = a.ldlb;
  g.a_trans = 0;
  g.b_trans = 0;
  g.m = a.m;
  g.n = a.r;
  g.k = a.out;
  g.c = a.dyb;
  g.ldc = a.lddyb;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dy B): " + err;

  g = GemmArgs();  // dx = dy W + s * dyb A
  g.a = a.dy;
  g.lda = a.lddy;
  g.b = a.w;
  g.ldb = a.ldw;
  g.k = a.out;
  g.a2 = a.dyb;
  g.lda2 = a.lddyb;
  g.b2 = a.la;
  g.ldb2 = a.ldla;
  g.k2 = a.r;
  g.alpha2 = a.scale;
  g.a_trans = 0;
  g.b_trans = 0;
  g.m = a.m;
  g.n = a.in;
  g.c = a.dx;
  g.ldc = a.lddx;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dx): " + err;

  g = GemmArgs();  // dA = s * dyb^T x
  g.a = a.dyb;
  g.lda = a.lddyb;
  g.a_trans = 1;
  g.b = a.x;
  g.ldb = a.ldx;
  g.b_trans = 0;
  g.m = a.r;
  g.n = a.in;
  g.k = a.m;
  g.alpha = a.scale;
  g.c = a.dla;
  g.ldc = a.lddla;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dA): " + err;

  g = GemmArgs();  // dB = s * dy^T xa
  g.a = a.dy;
  g.lda = a.lddy;
  g.a_trans = 1;
  g.b = a.xa;
  g.ldb = a.ldxa;
  g.b_trans = 0;
  g.m = a.out;
  g.n = a.r;
  g.k = a.m;
  g.alpha = a.scale;
  g.c = a.dlb;
  g.ldc = a.lddlb;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "lora_linear_bwd (dB): " + err;

  if (a.dw != 0) {  // dW = dy^T x, only when the base weight is trained
    g = GemmArgs();
    g.a = a.dy;
    g.lda = a.lddy;
    g.a_trans = 1;
    g.b = a.x;
    g.ldb = a.ldx;
    g.b_trans = 0;
    g.m = a.out;
    g.n = a.in;
    g.k = a.m;
    g.c = a.dw;
    g.ldc = a.lddw;
    g.dtype = a.dtype;
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
  GemmArgs g;  // y = W + s * B A
  g.a = a.lb;
  g.lda = a.ldlb;
  g.a_trans = 0;
  g.b = a.la;
  g.ldb = a.ldla;
  g.b_trans = 0;
  g.m = a.out;
  g.n = a.in;
  g.k = a.r;
  g.alpha = a.scale;
  g.residual = a.w;
  g.ldr = a.ldw;
  g.c = a.y;
  g.ldc = a.ldy;
  g.dtype = a.dtype;
  std::string err = gemm(g, stream);
  if (!err.empty()) return "merge_lora: " + err;
  return "";
}

}  // namespace rk
