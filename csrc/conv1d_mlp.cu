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
  GemmArgs g = gemm_args(a.x, a.ldx, 0, a.w1, a.ldw1, 1, a.m, a.hidden, a.c, a.h, a.ldh, a.dtype);
  g.bias = a.b1;
  g.epi = kEpiNone;  // c2 given: act(h) beside h
  g.act = a.act;
  g.c2 = a.act_h;
  g.ldc2 = a.ld_act_h;
  std::string err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_fwd (x W1^T): " + err;

  g = gemm_args(a.act_h, a.ld_act_h, 0, a.w2, a.ldw2, 1, a.m, a.c_out, a.hidden, a.y, a.ldy,
                a.dtype);
  g.bias = a.b2;
  err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_fwd (act(h) W2^T): " + err;
  return "";
}

std::string conv1d_mlp_bwd(const MlpArgs& a, uintptr_t stream) {
  if (a.m < 1 || a.c < 1 || a.hidden < 1 || a.c_out < 1)
    return "conv1d_mlp_bwd: expected M, C, hidden, C_out >= 1";
  // dh = (dy W2) o act'(h); act(h) to the act_h workspace on the side
  GemmArgs g =
      gemm_args(a.dy, a.lddy, 0, a.w2, a.ldw2, 0, a.m, a.hidden, a.c_out, a.dh, a.lddh, a.dtype);
  g.epi = kEpiDact;
  g.act = a.act;
  g.aux = a.h;
  g.ldaux = a.ldh;
  g.c2 = a.act_h;
  g.ldc2 = a.ld_act_h;
  std::string err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_bwd (dh): " + err;

  // dW2 = dy^T act(h); dw2 == 0 means frozen weights: skip both weight GEMMs
  if (a.dw2 != 0) {
    g = gemm_args(a.dy, a.lddy, 1, a.act_h, a.ld_act_h, 0, a.c_out, a.hidden, a.m, a.dw2,
                  a.lddw2, a.dtype);
    err = gemm(g, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (dW2): " + err;
  }

  if (a.db2 != 0) {
    err = colsum(a.dy, a.lddy, a.m, a.c_out, a.db2, a.dtype, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (db2): " + err;
  }

  // dW1 = dh^T x
  if (a.dw1 != 0) {
    g = gemm_args(a.dh, a.lddh, 1, a.x, a.ldx, 0, a.hidden, a.c, a.m, a.dw1, a.lddw1, a.dtype);
    err = gemm(g, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (dW1): " + err;
  }

  if (a.db1 != 0) {
    err = colsum(a.dh, a.lddh, a.m, a.hidden, a.db1, a.dtype, stream);
    if (!err.empty()) return "conv1d_mlp_bwd (db1): " + err;
  }

  // dx = dh W1
  g = gemm_args(a.dh, a.lddh, 0, a.w1, a.ldw1, 0, a.m, a.c, a.hidden, a.dx, a.lddx, a.dtype);
  err = gemm(g, stream);
  if (!err.empty()) return "conv1d_mlp_bwd (dx): " + err;
  return "";
}

}  // namespace rk
