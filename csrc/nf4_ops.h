// Host-callable NF4 entry points (implemented in nf4_kernels.cu, bound in bindings.cpp).
// Pointers are raw device (``*_cuda``) or host (``*_host``) addresses; shapes are checked
// by the bindings before these are called.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "nf4.cuh"

namespace datalora {

// out[i] = nf4 value i of ``data`` (n values) in dtype ``dt``.
cudaError_t dequantize_nf4_cuda(const uint8_t* data, const NF4Scales& sc, void* out, DType dt,
                                int64_t n, cudaStream_t stream);
void dequantize_nf4_host(const uint8_t* data, const NF4Scales& sc, void* out, DType dt,
                         int64_t n);

// Small-T fused decode: y[t] = W x[t] + bias + scaling * sum_j g[t,j] B[e] (rs[t] * (A[e] x[t])).
// x [T, K], W NF4 [N, K], bias [N] or null, A [E, r, K], B [E, N, r], y [T, N] in dtype dt
// (fp16 / bf16); ids [T, k] int32, gates [T, k] fp32, rank_scale [T, r] fp32 or null;
// z is an fp32 workspace of T*k*r floats (the shrink result). A may be null when k == 0.
struct MoLoRAArgs {
  const void* A;
  const void* B;
  const int32_t* ids;
  const float* gates;
  const float* rank_scale;
  float* z;
  int E, r, k;
  float scaling;
};

// One launch. `workspace`: kDecodeWorkspaceInts int32 on the device, zero before the launch
// and zero again after it (the kernel resets it), used by one stream at a time; unused (may
// be null) when k == 0.
cudaError_t nf4_molora_decode_cuda(const void* x, const uint8_t* w, const NF4Scales& sc,
                                   const void* bias, const MoLoRAArgs& lora, void* y, DType dt,
                                   int T, int K, int N, int* workspace, cudaStream_t stream);
void nf4_molora_decode_host(const void* x, const uint8_t* w, const NF4Scales& sc,
                            const void* bias, const MoLoRAArgs& lora, void* y, DType dt, int T,
                            int K, int N);

// Largest T the fused decode kernel is compiled for.
constexpr int kMaxDecodeTokens = 16;

// Size of the decode kernel's cross-CTA workspace, in int32.
constexpr int kDecodeWorkspaceInts = 3;

}  // namespace datalora
