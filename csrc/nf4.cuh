// NF4 (4-bit NormalFloat) decode helpers shared by the CUDA kernels and the host (CPU)
// entry points, so the math the GPU runs is the math the CPU tests check.
//
// Layout (bitsandbytes quantize_4bit, quant_type="nf4"): value i of the flattened tensor is
// nibble (i even: high, i odd: low) of byte i/2; its scale is absmax[i / blocksize]. With
// double quantization absmax is uint8 and decodes as
//     absmax_f[b] = nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset
// (fp32 multiply, then fp32 add: no FMA, to match bitsandbytes bit for bit).
// Value = nf4_value(nibble) * absmax_f (one fp32 multiply), rounded to the output type (RNE).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#define DL_HD __host__ __device__ __forceinline__

namespace datalora {

constexpr int kNestedBlocksize = 256;

// The 16 NF4 levels, selected without memory (compiles to selects on the GPU).
DL_HD float nf4_value(unsigned q) {
  return (q & 8)
      ? ((q & 4) ? ((q & 2) ? ((q & 1) ? 1.0f : 0.7229568362236023f)
                            : ((q & 1) ? 0.5626170039176941f : 0.44070982933044434f))
                 : ((q & 2) ? ((q & 1) ? 0.33791524171829224f : 0.24611230194568634f)
                            : ((q & 1) ? 0.16093020141124725f : 0.07958029955625534f)))
      : ((q & 4) ? ((q & 2) ? ((q & 1) ? 0.0f : -0.09105003625154495f)
                            : ((q & 1) ? -0.18477343022823334f : -0.28444138169288635f))
                 : ((q & 2) ? ((q & 1) ? -0.39491748809814453f : -0.5250730514526367f)
                            : ((q & 1) ? -0.6961928009986877f : -1.0f)));
}

// fp32 multiply / add that the compiler may not contract into an FMA.
DL_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DL_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Scales of one NF4 tensor: plain fp32 absmax or the double-quantized triple.
struct NF4Scales {
  const void* absmax;          // float[nblocks] or uint8[nblocks] when nested
  const float* nested_absmax;  // [ceil(nblocks / 256)] or nullptr
  const float* nested_code;    // [256] or nullptr
  const float* offset;         // [1] or nullptr
  int blocksize;

  DL_HD bool nested() const { return nested_absmax != nullptr; }

  DL_HD float block(int64_t b) const {
    if (!nested()) return static_cast<const float*>(absmax)[b];
    const uint8_t q = static_cast<const uint8_t*>(absmax)[b];
    return add_rn(mul_rn(nested_code[q], nested_absmax[b / kNestedBlocksize]), offset[0]);
  }
};

// Decoded value of nibble q under scale s.
DL_HD float nf4_decode(unsigned q, float s) { return mul_rn(nf4_value(q & 0xF), s); }

// Value i (flat index) of a packed tensor.
DL_HD float nf4_at(const uint8_t* data, const NF4Scales& sc, int64_t i) {
  const uint8_t byte = data[i >> 1];
  const unsigned q = (i & 1) ? (byte & 0xF) : (byte >> 4);
  return nf4_decode(q, sc.block(i / sc.blocksize));
}

// Output type conversions usable on host and device (round to nearest even).
template <typename T> DL_HD T from_float(float v);
template <> DL_HD float from_float<float>(float v) { return v; }
template <> DL_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> DL_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

DL_HD float to_float(float v) { return v; }
DL_HD float to_float(__half v) { return __half2float(v); }
DL_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Values per 16-byte chunk of packed data. blocksize >= 32 is a multiple of 32, so a chunk
// that starts at a multiple of 32 values lies inside one absmax block: one scale.
constexpr int kChunk = 32;

// Decodes one chunk (16 packed bytes, scale s) to 32 values of T; kernels and host twins
// both go through this.
template <typename T>
DL_HD void nf4_decode_chunk(const uint8_t* bytes, float s, T* out) {
#pragma unroll
  for (int j = 0; j < kChunk / 2; ++j) {
    out[2 * j] = from_float<T>(nf4_decode(bytes[j] >> 4, s));
    out[2 * j + 1] = from_float<T>(nf4_decode(bytes[j] & 0xF, s));
  }
}

// dtype tags used at the Python boundary.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace datalora
