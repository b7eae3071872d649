// conv1d_mlp: act(x W1^T + b1) W2^T + b2 as fused GEMMs (see gemm.cu for the kernel).
//
// forward:  [h, act(h)] = x W1^T + b1            (epilogue: bias, activation, two outputs)
//           y = act(h) W2^T + b2                  (epilogue: bias)
// backward: [dh, act(h)] = (dy W2) o act'(h)      (epilogue: activation derivative; act(h)
//                                                  recomputed here, never saved)
//           dW2 = dy^T act(h), db2 = colsum(dy), dW1 = dh^T x, db1 = colsum(dh), dx = dh W1
// Saved for backward (by the op): x and the pre-activation h.
#include "common.cuh"

namespace rk {

std::string conv1d_mlp_fwd(const MlpArgs& a, uintptr_t stream) {
  if (a.m < 1 || a.c < 1 || a.hidden < 1 || a.c_out < 1)
    return "conv1d_mlp_fwd: expected M, C, hidden, C_out >= 1";
  GemmArgs g1;
  g1.a = a.x;
  g1.lda = a.ldx;
  g1.b = a.w1;
  g1.ldb = a.ldw1;
  g1.a_trans = 0;
  g1.b_trans = 1;
  g1.m = a.m;
  g1.n = a.hidden;
  g1.k = a.c;
  g1.bias = a.b1;
  g1.epi = 1;
  g1.act = a.act;
  g1.c = a.h;
  g1.ldc = a.ldh;
  g1.c2 = a.act_h;
  g1.ldc2 = a.ld_act_h;
  g1.dtype = a.dtype;
  std::string err = gemm(g1, stream);
  if (!err.empty()) return "conv1d_mlp_fwd (x W1^T): " + err;

  GemmArgs g2;
  g2.a = a.act_h;
  g2.lda = a.ld_act_h;
  g2.b = a.w2;
  g2.ldb = a.ldw2;
  g2.a_trans = 0;
  g2.b_trans = 1;
  g2.m = a.m;
  g2.n = a.c_out;
  g2.k = a.hidden;
  g2.bias = a.b2;
  g2.c = a.y;
  g2.ldc = a.ldy;
  g2.dtype = a.dtype;
  err = gemm(g2, stream);
  if (!err.empty()) return "conv1d_mlp_fwd (act(h) W2^T): " + err;
  return "";
}

std::string conv1d_mlp_bwd(const MlpArgs& a, uintptr_t stream) {
  if (a.m < 1 || a.c < 1 || a.hidden < 1 || a.c_out < 1)
    return "conv1d_mlp_bwd: expected M, C, hidden, C_out >= 1";
  // dh = (dy W2) o act'(h); act(h) to the act_h workspace on the side
  GemmArgs g;
  g.a = a.dy;
  g.lda = a.lddy;
  g.b = a.w2;
  g.ldb = a.ldw2;
  g.a_trans = 0;
  g.b_trans = 0;
  g.m = a.m;
  g.n = a.hidden;
  g.k = a.c_out;
  g.epi = 2;
  g.act = a.act;
  g.aux = a.h;
  g.ldaux = a.ldh;
  g.c = a.dh;
  g.ldc = a.lddh;
  g.c2 = a.act_h;
  g.ldc2 = a.ld_act_h;
  g.dtype = a.dtype;
  std::string err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_bwd (dh): " + err;

  // dW2 = dy^T act(h); dw2 == 0 means frozen weights: skip both weight GEMMs
  if (a.dw2 != 0) {
    g = GemmArgs();
    g.a = a.dy;
    g.lda = a.lddy;
    g.a_trans = 1;
    g.b = a.act_h;
    g.ldb = a.ld_act_h;
    g.b_trans = 0;
    g.m = a.c_out;
    g.n = a.hidden;
    g.k = a.m;
    g.c = a.dw2;
    g.ldc = a.lddw2;
    g.dtype = a.dtype;
    err = gemm(g, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (dW2): " + err;
  }

  if (a.db2 != 0) {
    err = colsum(a.dy, a.lddy, a.m, a.c_out, a.db2, a.dtype, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (db2): " + err;
  }

  // dW1 = dh^T x
  if (a.dw1 != 0) {
    g = GemmArgs();
    g.a = a.dh;
    g.lda = a.lddh;
    g.a_trans = 1;
    g.b = a.x;
    g.ldb = a.ldx;
    g.b_trans = 0;
    g.m = a.hidden;
    g.n = a.c;
    g.k = a.m;
    g.c = a.dw1;
    g.ldc = a.lddw1;
    g.dtype = a.dtype;
    err = gemm(g, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (dW1): " + err;
  }

  if (a.db1 != 0) {
    err = colsum(a.dh, a.lddh, a.m, a.hidden, a.db1, a.dtype, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (db1): " + err;
  }

  // dx = dh W1
  g = GemmArgs();
  g.a = a.dh;
  g.lda = a.lddh;
  g.a_trans = 0;
  g.b = a.w1;
  g.ldb = a.ldw1;
  g.b_trans = 0;
  g.m = a.m;
  g.n = a.c;
  g.k = a.hidden;
  g.c = a.dx;
  g.ldc = a.lddx;
  g.dtype = a.dtype;
  err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_bwd (dx): " + err;
  return "";
}

}  // namespace rk
