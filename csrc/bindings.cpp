// pybind11 boundary of datalora._C: raw pointers (tensor.data_ptr()), shapes and the
// current CUDA stream cross it, so the module never links libtorch and one build serves
// every torch version. Every argument is checked here; kernels assume valid input.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <sstream>
#include <string>

#include "nf4_ops.h"

// The archs setup.py compiled for (it writes this header into the build directory); a build
// without it reports none, and the loader then cannot check a device against them.
#if __has_include("datalora_build_info.h")
#include "datalora_build_info.h"
#endif
#ifndef DATALORA_SASS_ARCHS
#define DATALORA_SASS_ARCHS ""
#define DATALORA_PTX_ARCHS ""
#endif

namespace py = pybind11;
using datalora::DType;
using datalora::MoLoRAArgs;
using datalora::NF4Scales;

namespace {

template <typename... Args>
[[noreturn]] void fail(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw py::value_error(os.str());
}

template <typename P>
P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

void need(const char* name, uintptr_t p) {
  if (p == 0) fail(name, ": expected a non-null data_ptr, got 0");
}

void aligned16(const char* name, uintptr_t p) {
  if (p % 16 != 0) fail(name, ": expected a 16-byte aligned data_ptr, got address ", p);
}

DType dtype_of(int code, bool allow_fp32) {
  if (code == 1 || code == 2 || (allow_fp32 && code == 0)) return static_cast<DType>(code);
  fail("dtype: expected ", allow_fp32 ? "0 (float32), " : "", "1 (float16) or 2 (bfloat16), got ",
       code);
}

NF4Scales scales(uintptr_t absmax, uintptr_t nested_absmax, uintptr_t nested_code,
                 uintptr_t offset, int blocksize) {
  need("absmax", absmax);
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    fail("blocksize: expected a power of two in [32, 4096], got ", blocksize);
  const bool any = nested_absmax || nested_code || offset;
  const bool all = nested_absmax && nested_code && offset;
  if (any && !all)
    fail("nested_absmax, nested_code, offset: expected all three non-null (double quant) or "
         "all null, got ", nested_absmax, ", ", nested_code, ", ", offset);
  return NF4Scales{ptr<const void>(absmax), ptr<const float>(nested_absmax),
                   ptr<const float>(nested_code), ptr<const float>(offset), blocksize};
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

struct DecodeCall {
  NF4Scales sc;
  MoLoRAArgs lora;
  DType dt;
};

DecodeCall check_decode(uintptr_t x, uintptr_t w, uintptr_t absmax, uintptr_t nested_absmax,
                        uintptr_t nested_code, uintptr_t offset, int blocksize, uintptr_t A,
                        uintptr_t B, uintptr_t ids, uintptr_t gates, uintptr_t rank_scale,
                        uintptr_t z, uintptr_t y, int T, int K, int N, int E, int r, int k,
                        float scaling, int dtype, bool device) {
  need("x", x);
  need("w", w);
  need("y", y);
  if (T < 1 || T > datalora::kMaxDecodeTokens)
    fail("T: expected 1..", datalora::kMaxDecodeTokens, " tokens, got ", T);
  if (K < 32 || K % 32 != 0) fail("K: expected a positive multiple of 32, got ", K);
  if (N < 1) fail("N: expected >= 1, got ", N);
  if (k < 0 || r < 0 || E < 0) fail("k, r, E: expected >= 0, got ", k, ", ", r, ", ", E);
  if (k > 0) {
    if (r < 1 || E < 1) fail("r, E: expected >= 1 with k > 0, got ", r, ", ", E);
    if (k > E) fail("k: expected <= E=", E, ", got ", k);
    need("A", A);
    need("B", B);
    need("ids", ids);
    need("gates", gates);
    need("z", z);
  }
  if (device) {
    aligned16("x", x);
    aligned16("w", w);
    if (k > 0) aligned16("A", A);
  }
  DecodeCall call{scales(absmax, nested_absmax, nested_code, offset, blocksize),
                  MoLoRAArgs{ptr<const void>(A), ptr<const void>(B), ptr<const int32_t>(ids),
                             ptr<const float>(gates), ptr<const float>(rank_scale), ptr<float>(z),
                             E, r, k, scaling},
                  dtype_of(dtype, false)};
  return call;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "datalora CUDA extension: bitsandbytes-format NF4 dequant and fused NF4 + MoLoRA";

  m.def("cuda_runtime_version", []() { return CUDART_VERSION; },
        "CUDA runtime version the extension was compiled with (e.g. 13000).");
  m.def("device_count", []() {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
          cudaGetLastError();  // clear the sticky "no driver / no device" error
          return 0;
        }
        return n;
      }, "Visible CUDA devices; 0 without a driver or GPU (never raises).");
  m.def("compiled_archs", []() {
        py::dict archs;
        archs["sass"] = DATALORA_SASS_ARCHS;
        archs["ptx"] = DATALORA_PTX_ARCHS;
        return archs;
      }, "The archs compiled in: {'sass': '75;80;90', 'ptx': '90'} (cubins; PTX JIT-compiles "
         "for newer GPUs). Empty strings when the build did not record them.");

  m.def("dequantize_nf4",
        [](uintptr_t data, uintptr_t absmax, uintptr_t nested_absmax, uintptr_t nested_code,
           uintptr_t offset, uintptr_t out, int64_t n, int blocksize, int dtype,
           uintptr_t stream) {
          need("data", data);
          need("out", out);
          if (n < 1) fail("n: expected >= 1, got ", n);
          const NF4Scales sc = scales(absmax, nested_absmax, nested_code, offset, blocksize);
          check_cuda(datalora::dequantize_nf4_cuda(ptr<const uint8_t>(data), sc, ptr<void>(out),
                                                   dtype_of(dtype, true), n,
                                                   reinterpret_cast<cudaStream_t>(stream)),
                     "dequantize_nf4 launch");
        },
        py::arg("data"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("out"), py::arg("n"), py::arg("blocksize"), py::arg("dtype"),
        py::arg("stream"),
        "Dequantize n NF4 values (device pointers) into out on the given CUDA stream.");

  m.def("dequantize_nf4_host",
        [](uintptr_t data, uintptr_t absmax, uintptr_t nested_absmax, uintptr_t nested_code,
           uintptr_t offset, uintptr_t out, int64_t n, int blocksize, int dtype) {
          need("data", data);
          need("out", out);
          if (n < 1) fail("n: expected >= 1, got ", n);
          const NF4Scales sc = scales(absmax, nested_absmax, nested_code, offset, blocksize);
          py::gil_scoped_release release;
          datalora::dequantize_nf4_host(ptr<const uint8_t>(data), sc, ptr<void>(out),
                                        dtype_of(dtype, true), n);
        },
        py::arg("data"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("out"), py::arg("n"), py::arg("blocksize"), py::arg("dtype"),
        "CPU twin of dequantize_nf4 (host pointers), built from the same nf4.cuh helpers.");

  m.def("nf4_molora_decode",
        [](uintptr_t x, uintptr_t w, uintptr_t absmax, uintptr_t nested_absmax,
           uintptr_t nested_code, uintptr_t offset, int blocksize, uintptr_t bias, uintptr_t A,
           uintptr_t B, uintptr_t ids, uintptr_t gates, uintptr_t rank_scale, uintptr_t z,
           uintptr_t y, int T, int K, int N, int E, int r, int k, float scaling, int dtype,
           uintptr_t workspace, int workspace_ints, uintptr_t stream) {
          const DecodeCall c = check_decode(x, w, absmax, nested_absmax, nested_code, offset,
                                            blocksize, A, B, ids, gates, rank_scale, z, y, T, K,
                                            N, E, r, k, scaling, dtype, true);
          if (k > 0) {
            need("workspace", workspace);
            if (workspace % alignof(int) != 0)
              fail("workspace: expected a 4-byte aligned data_ptr, got address ", workspace);
            if (workspace_ints < datalora::kDecodeWorkspaceInts)
              fail("workspace_ints: expected >= ", datalora::kDecodeWorkspaceInts, ", got ",
                   workspace_ints);
          }
          check_cuda(datalora::nf4_molora_decode_cuda(
                         ptr<const void>(x), ptr<const uint8_t>(w), c.sc, ptr<const void>(bias),
                         c.lora, ptr<void>(y), c.dt, T, K, N, ptr<int>(workspace),
                         reinterpret_cast<cudaStream_t>(stream)),
                     "nf4_molora_decode launch");
        },
        py::arg("x"), py::arg("w"), py::arg("absmax"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"), py::arg("bias"),
        py::arg("A"), py::arg("B"), py::arg("ids"), py::arg("gates"), py::arg("rank_scale"),
        py::arg("z"), py::arg("y"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("E"),
        py::arg("r"), py::arg("k"), py::arg("scaling"), py::arg("dtype"), py::arg("workspace"),
        py::arg("workspace_ints"), py::arg("stream"),
        "y = x @ dequant(W)^T + bias + MoLoRA delta for 1..16 tokens in one launch (device "
        "pointers; workspace: decode_workspace_ints() int32, zero, one stream at a time).");

  m.def("decode_workspace_ints", []() { return datalora::kDecodeWorkspaceInts; },
        "int32 words of the workspace nf4_molora_decode needs (zero-filled once; the kernel "
        "leaves it zero).");

  m.def("nf4_molora_decode_host",
        [](uintptr_t x, uintptr_t w, uintptr_t absmax, uintptr_t nested_absmax,
           uintptr_t nested_code, uintptr_t offset, int blocksize, uintptr_t bias, uintptr_t A,
           uintptr_t B, uintptr_t ids, uintptr_t gates, uintptr_t rank_scale, uintptr_t z,
           uintptr_t y, int T, int K, int N, int E, int r, int k, float scaling, int dtype) {
          const DecodeCall c = check_decode(x, w, absmax, nested_absmax, nested_code, offset,
                                            blocksize, A, B, ids, gates, rank_scale, z, y, T, K,
                                            N, E, r, k, scaling, dtype, false);
          py::gil_scoped_release release;
          datalora::nf4_molora_decode_host(ptr<const void>(x), ptr<const uint8_t>(w), c.sc,
                                           ptr<const void>(bias), c.lora, ptr<void>(y), c.dt, T,
                                           K, N);
        },
        py::arg("x"), py::arg("w"), py::arg("absmax"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"), py::arg("bias"),
        py::arg("A"), py::arg("B"), py::arg("ids"), py::arg("gates"), py::arg("rank_scale"),
        py::arg("z"), py::arg("y"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("E"),
        py::arg("r"), py::arg("k"), py::arg("scaling"), py::arg("dtype"),
        "CPU twin of nf4_molora_decode (host pointers), same math and epilogue.");
}
