// pybind11 surface of recon_kernels._cuda (and of the test-only CPU emulation build
// recon_kernels._cuda_emu, compiled from the same sources with RECON_EMULATE).
//
// Each launcher takes an argument struct (fields from launchers.h) and the stream as an
// integer, and raises RuntimeError with the launcher's message (a CUDA error string or a
// violated precondition) instead of returning it.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launchers.h"

#ifndef RECON_EMULATE
#include <cuda_runtime_api.h>
#define RK_MODULE_NAME _cuda
#else
#define RK_MODULE_NAME _cuda_emu
#endif

#ifndef RK_CUDA_ARCHS
#define RK_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace rk {

std::string device_status() {
#ifdef RECON_EMULATE
  return "";
#else
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not a sticky error: clear it
    return std::string("no usable CUDA device: cudaGetDeviceCount failed with ") +
           cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  }
  if (n == 0) return "no usable CUDA device: cudaGetDeviceCount found 0 devices";
  return "";
#endif
}

}  // namespace rk

namespace {

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

template <class Args>
void bind_launcher(py::module_& m, const char* name, std::string (*fn)(const Args&, uintptr_t),
                   const char* doc) {
  m.def(
      name, [fn](const Args& a, uintptr_t stream) { raise_if(fn(a, stream)); }, py::arg("args"),
      py::arg("stream"), doc);
}

}  // namespace

// module_local: the GPU and the emulation builds bind the same C++ structs; each module keeps
// its own Python types so both can be imported in one process.
#define RK_BIND_FIELD(type, name, init) cls.def_readwrite(#name, &Struct::name);

PYBIND11_MODULE(RK_MODULE_NAME, m) {
  m.doc() = "recon-kernels CUDA C++ launchers (raw device pointers, no libtorch)";
  {
    using Struct = rk::AttnArgs;
    py::class_<Struct> cls(m, "AttnArgs", py::module_local());
    cls.def(py::init<>());
    RK_ATTN_FIELDS(RK_BIND_FIELD)
  }
  {
    using Struct = rk::GemmArgs;
    py::class_<Struct> cls(m, "GemmArgs", py::module_local());
    cls.def(py::init<>());
    RK_GEMM_FIELDS(RK_BIND_FIELD)
  }
  {
    using Struct = rk::MlpArgs;
    py::class_<Struct> cls(m, "MlpArgs", py::module_local());
    cls.def(py::init<>());
    RK_MLP_FIELDS(RK_BIND_FIELD)
  }
  {
    using Struct = rk::LoraArgs;
    py::class_<Struct> cls(m, "LoraArgs", py::module_local());
    cls.def(py::init<>());
    RK_LORA_FIELDS(RK_BIND_FIELD)
  }

  bind_launcher(m, "attention_fwd", &rk::attention_fwd, "out, lse = softmax(q k^T scale) v");
  m.def(
      "attention_fwd_tiles",
      [](int dtype, int d) {
        rk::AttnFwdTiles t;
        raise_if(rk::attention_fwd_tiles(dtype, d, &t));
        py::dict r;
        r["head_dim_bucket"] = t.head_dim_bucket;
        r["block_m"] = t.block_m;
        r["block_n"] = t.block_n;
        r["sub_n"] = t.sub_n;
        r["warps"] = t.warps;
        r["rows_per_warp"] = t.rows_per_warp;
        r["stages"] = t.stages;
        r["q_in_regs"] = static_cast<bool>(t.q_in_regs);
        r["smem_bytes"] = t.smem_bytes;
        return r;
      },
      py::arg("dtype"), py::arg("d"), "the forward's tile configuration for (dtype code, head dim)");
  m.def(
      "attention_fwd_choice", [](const rk::AttnArgs& a) { return rk::attention_fwd_choice(a); },
      py::arg("args"), "which forward kernel attention_fwd runs: 'sm90' or 'sm80: <why>'");
  m.def(
      "attention_bwd_choice", [](const rk::AttnArgs& a) { return rk::attention_bwd_choice(a); },
      py::arg("args"), "which backward kernels attention_bwd runs: 'sm90' or 'sm80: <why>'");
  m.def(
      "attention_bwd_workspace", [](const rk::AttnArgs& a) { return rk::attention_bwd_workspace(a); },
      py::arg("args"), "float32 elements of the zeroed dq_accum workspace of the sm_90a backward");
  bind_launcher(m, "attention_bwd", &rk::attention_bwd, "delta, then dq, dk, dv");
  bind_launcher(m, "gemm", &rk::gemm, "the fused-epilogue GEMM");
  bind_launcher(m, "conv1d_mlp_fwd", &rk::conv1d_mlp_fwd, "y, h (and act(h) workspace)");
  bind_launcher(m, "conv1d_mlp_bwd", &rk::conv1d_mlp_bwd, "dx, dw1, db1, dw2, db2");
  bind_launcher(m, "lora_linear_fwd", &rk::lora_linear_fwd, "y, xa");
  bind_launcher(m, "lora_linear_bwd", &rk::lora_linear_bwd, "dx, dw, dbias, dA, dB");
  bind_launcher(m, "merge_lora", &rk::merge_lora, "w + scale * lora_b @ lora_a");
  m.def(
      "colsum",
      [](uint64_t x, int64_t ldx, int rows, int cols, uint64_t out, int dtype,
         uintptr_t stream) { raise_if(rk::colsum(x, ldx, rows, cols, out, dtype, stream)); },
      py::arg("x"), py::arg("ldx"), py::arg("m"), py::arg("n"), py::arg("out"),
      py::arg("dtype"), py::arg("stream"), "out[n] = sum over rows of x (m, n)");

  m.def(
      "hopper_selftest",
      [](int mode, int dtype, int n, int swizzle, uint64_t a, int rows_a, uint64_t b, int rows_b,
         uint64_t out, uint64_t out2) {
        raise_if(rk::hopper_selftest(mode, dtype, n, swizzle, a, rows_a, b, rows_b, out, out2));
      },
      py::arg("mode"), py::arg("dtype"), py::arg("n"), py::arg("swizzle"), py::arg("a"),
      py::arg("rows_a"), py::arg("b"), py::arg("rows_b"), py::arg("out"), py::arg("out2"),
      "wgmma / TMA / mbarrier / setmaxnreg self-test (csrc/hopper_selftest.cu)");
  m.def(
      "flag_selftest",
      [](uint64_t counter, uint64_t order, int blocks, bool reverse) {
        raise_if(rk::flag_selftest(counter, order, blocks, reverse));
      },
      py::arg("counter"), py::arg("order"), py::arg("blocks"), py::arg("reverse"),
      "global-flag turns self-test (csrc/hopper_selftest.cu: flag_wait_ge, flag_release_add)");
  m.def("device_status", &rk::device_status,
        "'' when a CUDA device can run the kernels, else why not (never raises)");
  m.def(
      "device_count",
      []() {
#ifdef RECON_EMULATE
        return 0;
#else
        raise_if(rk::device_status());
        int n = 0;
        cudaGetDeviceCount(&n);
        return n;
#endif
      },
      "number of visible CUDA devices; RuntimeError naming the CUDA error when there is none");
#ifdef RECON_EMULATE
  m.def(
      "launch_counts",
      []() {
        py::dict d;
        for (const auto& kv : rk::emu_launch_counts()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "emulator only: {kernel name: launches} since the module was loaded (tests: which kernel ran)");
#endif
  py::dict info;
  info["archs"] = RK_CUDA_ARCHS;
#ifdef RECON_EMULATE
  info["emulated"] = true;
  info["cuda_runtime"] = 0;
#else
  info["emulated"] = false;
  info["cuda_runtime"] = CUDART_VERSION;
#endif
  m.attr("build_info") = info;
}
