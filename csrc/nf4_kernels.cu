// NF4 CUDA kernels and their host (CPU) twins, both built on nf4.cuh.
//
// dequant: one thread decodes a 32-value chunk (16 packed bytes, one uint4 load; a chunk
//   never straddles an absmax block because blocksize >= 32 is a multiple of 32) and writes
//   it with 16-byte stores; the n % 32 tail is decoded value by value.
// decode (small T), one launch: y[t] = W x[t] + bias + sum_{j,i} z[t,j,i] B[e_tj, o, i] with
//   z[t, j, :] = scaling * g[t,j] * rs[t] * (A[e_tj] x[t]). One warp per output row streams
//   its NF4 row of W once (uint4 loads, two in flight per lane) and dots it with the T
//   tokens; the k*r shrink dot products ("tasks", one warp each) are cut into chunks of
//   kDecodeWarps tasks that the first CTAs compute before their own rows, so the shrink
//   overlaps the weight stream and only the expand, at the very end, waits for z. The wait is a cross-CTA handshake on a
//   three-int workspace (DecodeSync below; the release / acquire pattern of CUTLASS's
//   barriers): a CTA that finds z unfinished first claims and computes any chunk nobody has
//   started, so it only ever waits on CTAs that are running (no deadlock whatever order the
//   hardware starts CTAs in), and the last CTA past the wait zeroes the workspace for the
//   next launch on the stream. Almost every CTA finds z done: one acquire load.
//   The kernel is bound by reading W (K*N/2 bytes): x, A and B are small and stay in L2.
#include <cuda/atomic>

#include <algorithm>
#include <vector>

#include "nf4_ops.h"

namespace datalora {
namespace {

constexpr int kDequantThreads = 256;
constexpr int kDecodeWarps = 8;     // output rows per CTA of the decode kernel

template <typename T> struct Vec16 {  // T elements per 16 bytes
  static constexpr int n = 16 / sizeof(T);
};

// Epilogue of the shrink: scaling * gate * rank_scale of route (t, j) at rank i.
DL_HD float route_scale(const MoLoRAArgs& lora, int route, int t, int i) {
  float s = lora.scaling * lora.gates[route];
  if (lora.rank_scale != nullptr) s *= lora.rank_scale[t * lora.r + i];
  return s;
}

// Expert of a route, clamped to [0, E) as the Triton kernels do: ids that skipped the host-side
// value check (DATALORA_CHECK_VALUES=0, check_values=False, CUDA-graph capture) never read
// outside A / B.
DL_HD int expert_of(const MoLoRAArgs& lora, int route) {
  const int e = lora.ids[route];
  return e < 0 ? 0 : (e >= lora.E ? lora.E - 1 : e);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
dequant_nf4_kernel(const uint8_t* __restrict__ data, NF4Scales sc, T* __restrict__ out,
                   int64_t n, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nchunks = n / kChunk;
  for (int64_t c = tid; c < nchunks; c += stride) {
    alignas(16) uint8_t bytes[16];
    if (vec) {
      *reinterpret_cast<uint4*>(bytes) = __ldg(reinterpret_cast<const uint4*>(data) + c);
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) bytes[j] = data[c * 16 + j];
    }
    alignas(16) T vals[kChunk];
    nf4_decode_chunk(bytes, sc.block(c * kChunk / sc.blocksize), vals);
    T* dst = out + c * kChunk;
    if (vec) {
#pragma unroll
      for (int j = 0; j < kChunk / Vec16<T>::n; ++j)
        reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(vals)[j];
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) dst[j] = vals[j];
    }
  }
  const int64_t i = nchunks * kChunk + tid;
  if (i < n) out[i] = from_float<T>(nf4_at(data, sc, i));
}

// Words of the decode workspace (int32, zero between launches).
enum DecodeSync : int { kNextChunk = 0, kChunksDone = 1, kCtasPast = 2 };

// A spinning CTA gives up (a launch error instead of a hang) after this many polls of at
// least 64 ns each while the CTAs it waits on run (microseconds of work): only a workspace
// that was not zero at launch can get here.
constexpr unsigned kMaxSpins = 1u << 22;

using DeviceInt = cuda::atomic_ref<int, cuda::thread_scope_device>;

// Shrink task `task` (route t*k + j, rank i) by one warp: lane 0 stores z[task] =
// dot(A[e, i], x[t]) times the route's scale.
template <typename T>
__device__ void shrink_task(const T* __restrict__ x, const MoLoRAArgs& lora, int task, int K,
                            int lane) {
  const int i = task % lora.r, route = task / lora.r, t = route / lora.k;
  const int e = expert_of(lora, route);
  const T* a = static_cast<const T*>(lora.A) + (static_cast<int64_t>(e) * lora.r + i) * K;
  const T* xt = x + static_cast<int64_t>(t) * K;
  constexpr int V = Vec16<T>::n;
  float acc = 0.f;
  for (int c = lane; c < K / V; c += 32) {
    const uint4 av = __ldg(reinterpret_cast<const uint4*>(a) + c);
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xt) + c);
    const T* ae = reinterpret_cast<const T*>(&av);
    const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int j = 0; j < V; ++j) acc += to_float(ae[j]) * to_float(xe[j]);
  }
  acc = warp_sum(acc);
  if (lane == 0) lora.z[task] = acc * route_scale(lora, route, t, i);
}

// The CTA claims the next unstarted shrink chunk and computes it (warp w: task
// chunk * kDecodeWarps + w); false when every chunk is already claimed. CTA-uniform. The
// CTA's z stores are released to the device by thread 0's increment of the done count.
template <typename T>
__device__ bool run_next_chunk(const T* __restrict__ x, const MoLoRAArgs& lora, int tasks,
                               int chunks, int K, int* ws) {
  __shared__ int chunk;
  if (threadIdx.x == 0) {
    DeviceInt next(ws[kNextChunk]);
    chunk = next.load(cuda::memory_order_relaxed) < chunks
                ? next.fetch_add(1, cuda::memory_order_relaxed) : chunks;
  }
  __syncthreads();
  const int c = chunk;
  __syncthreads();  // `chunk` is rewritten by the next call
  if (c >= chunks) return false;
  const int task = c * kDecodeWarps + threadIdx.x / 32;
  if (task < tasks) shrink_task(x, lora, task, K, threadIdx.x % 32);
  __syncthreads();
  if (threadIdx.x == 0) DeviceInt(ws[kChunksDone]).fetch_add(1, cuda::memory_order_release);
  return true;
}

// Returns once every shrink chunk is done (z readable by the whole CTA), then counts the CTA
// past its last workspace access; the last one zeroes the workspace. CTA-uniform.
template <typename T>
__device__ void wait_for_shrink(const T* __restrict__ x, const MoLoRAArgs& lora, int tasks,
                                int chunks, int K, int* ws) {
  __shared__ int pending;
  if (threadIdx.x == 0) {
    pending = DeviceInt(ws[kChunksDone]).load(cuda::memory_order_acquire) < chunks;
  }
  __syncthreads();
  if (pending) {  // rare: help with chunks nobody has started, then wait for the rest
    while (run_next_chunk(x, lora, tasks, chunks, K, ws)) {
    }
    if (threadIdx.x == 0) {
      DeviceInt done(ws[kChunksDone]);
      for (unsigned spins = 0; done.load(cuda::memory_order_acquire) < chunks; ++spins) {
        if (spins == kMaxSpins) __trap();
        __nanosleep(64);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && DeviceInt(ws[kCtasPast]).fetch_add(1, cuda::memory_order_acq_rel) ==
                              static_cast<int>(gridDim.x) - 1) {
    ws[kNextChunk] = 0;  // every other CTA is past its last workspace access
    ws[kChunksDone] = 0;
    ws[kCtasPast] = 0;
  }
}

// Occupancy floor per token tile: 4 CTAs / SM (<= 64 registers) up to 2 tokens; 3 for more,
// where 64 registers spill.
template <typename T, int TT>
__global__ void __launch_bounds__(kDecodeWarps * 32, TT <= 2 ? 4 : 3)
nf4_decode_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, NF4Scales sc,
                  const T* __restrict__ bias, MoLoRAArgs lora, T* __restrict__ y, int T_, int K,
                  int N, int* ws) {
  const int tasks = T_ * lora.k * lora.r;
  const int chunks = (tasks + kDecodeWarps - 1) / kDecodeWarps;
  // 1. the first `chunks` CTAs each compute a shrink chunk before their rows
  if (static_cast<int>(blockIdx.x) < chunks) run_next_chunk(x, lora, tasks, chunks, K, ws);

  // 2. base GEMV: this warp's output row against the T tokens
  const int o = blockIdx.x * kDecodeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) acc[t] = 0.f;
  if (o < N) {
    const int64_t row = static_cast<int64_t>(o) * K;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + row / 2);
    constexpr int V = Vec16<T>::n;
    const int row_chunks = K / kChunk;
    // two 16-byte loads in flight per lane: the next chunk streams in during this one's math
    uint4 next = lane < row_chunks ? __ldg(wrow + lane) : make_uint4(0, 0, 0, 0);
    for (int c = lane; c < row_chunks; c += 32) {
      const uint4 packed = next;
      if (c + 32 < row_chunks) next = __ldg(wrow + c + 32);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
      // rounded to T: the same weights dequantize() + matmul would use
      T wq[kChunk];
      nf4_decode_chunk(bytes, sc.block((row + static_cast<int64_t>(c) * kChunk) / sc.blocksize),
                       wq);
      float wv[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) wv[j] = to_float(wq[j]);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t < T_) {
          const uint4* xv = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(t) * K) +
                            c * (kChunk / V);
#pragma unroll
          for (int q = 0; q < kChunk / V; ++q) {
            const uint4 xq = __ldg(xv + q);
            const T* xe = reinterpret_cast<const T*>(&xq);
#pragma unroll
            for (int j = 0; j < V; ++j) acc[t] += wv[q * V + j] * to_float(xe[j]);
          }
        }
      }
    }
  }

  // 3. row sums, parked in shared memory while the CTA waits for z (and, rarely, helps
  //    with shrink chunks nobody has started)
  __shared__ float parked[kDecodeWarps][TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    const float row_sum = warp_sum(acc[t]);
    if (lane == 0) parked[threadIdx.x / 32][t] = row_sum;
  }
  // no early return anywhere above: every CTA must count itself past the wait, or the
  // workspace is not zeroed for the next launch
  if (chunks > 0) wait_for_shrink(x, lora, tasks, chunks, K, ws);
  __syncthreads();

  // 4. expand of the routed experts (lanes split the k*r terms of a token), bias, one store
  if (o < N) {
    const int kr = lora.k * lora.r;
    const T* Bm = static_cast<const T*>(lora.B);
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t < T_) {
        float lora_sum = 0.f;
        for (int idx = lane; idx < kr; idx += 32) {
          const int j = idx / lora.r, i = idx % lora.r;
          const int e = expert_of(lora, t * lora.k + j);
          const float b = to_float(Bm[(static_cast<int64_t>(e) * N + o) * lora.r + i]);
          lora_sum += __ldcg(lora.z + t * kr + idx) * b;  // L2: written by other CTAs
        }
        const float v = parked[threadIdx.x / 32][t] + warp_sum(lora_sum);
        if (lane == 0) {
          const float bv = bias != nullptr ? to_float(bias[o]) : 0.f;
          y[static_cast<int64_t>(t) * N + o] = from_float<T>(v + bv);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_dequant(const uint8_t* data, const NF4Scales& sc, T* out, int64_t n,
                           cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(data) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t work = std::max<int64_t>(n / kChunk, n % kChunk);
  const int64_t blocks = std::max<int64_t>(1, (work + kDequantThreads - 1) / kDequantThreads);
  dequant_nf4_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)),
                          kDequantThreads, 0, stream>>>(data, sc, out, n, vec);
  return cudaGetLastError();
}

template <typename T, int TT>
void launch_decode_tt(const T* x, const uint8_t* w, const NF4Scales& sc, const T* bias,
                      const MoLoRAArgs& lora, T* y, int T_, int K, int N, int* ws,
                      cudaStream_t stream) {
  // one CTA per kDecodeWarps rows, and at least one per shrink chunk
  const int64_t chunks = (static_cast<int64_t>(T_) * lora.k * lora.r + kDecodeWarps - 1) /
                         kDecodeWarps;
  const int64_t blocks = std::max<int64_t>((N + kDecodeWarps - 1) / kDecodeWarps, chunks);
  nf4_decode_kernel<T, TT><<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, stream>>>(
      x, w, sc, bias, lora, y, T_, K, N, ws);
}

template <typename T>
cudaError_t launch_decode(const T* x, const uint8_t* w, const NF4Scales& sc, const T* bias,
                          const MoLoRAArgs& lora, T* y, int T_, int K, int N, int* ws,
                          cudaStream_t stream) {
  if (T_ <= 1) launch_decode_tt<T, 1>(x, w, sc, bias, lora, y, T_, K, N, ws, stream);
  else if (T_ <= 2) launch_decode_tt<T, 2>(x, w, sc, bias, lora, y, T_, K, N, ws, stream);
  else if (T_ <= 4) launch_decode_tt<T, 4>(x, w, sc, bias, lora, y, T_, K, N, ws, stream);
  else if (T_ <= 8) launch_decode_tt<T, 8>(x, w, sc, bias, lora, y, T_, K, N, ws, stream);
  else launch_decode_tt<T, 16>(x, w, sc, bias, lora, y, T_, K, N, ws, stream);
  return cudaGetLastError();
}

template <typename T>
void dequant_host(const uint8_t* data, const NF4Scales& sc, T* out, int64_t n) {
  const int64_t nchunks = n / kChunk;
  for (int64_t c = 0; c < nchunks; ++c)
    nf4_decode_chunk(data + c * 16, sc.block(c * kChunk / sc.blocksize), out + c * kChunk);
  for (int64_t i = nchunks * kChunk; i < n; ++i) out[i] = from_float<T>(nf4_at(data, sc, i));
}

template <typename T>
void decode_host(const T* x, const uint8_t* w, const NF4Scales& sc, const T* bias,
                 const MoLoRAArgs& lora, T* y, int T_, int K, int N) {
  const T* A = static_cast<const T*>(lora.A);
  const T* B = static_cast<const T*>(lora.B);
  for (int t = 0; t < T_; ++t) {  // shrink, same epilogue as the kernel
    for (int j = 0; j < lora.k; ++j) {
      const int route = t * lora.k + j, e = expert_of(lora, route);
      for (int i = 0; i < lora.r; ++i) {
        float acc = 0.f;
        for (int c = 0; c < K; ++c)
          acc += to_float(A[(static_cast<int64_t>(e) * lora.r + i) * K + c]) *
                 to_float(x[static_cast<int64_t>(t) * K + c]);
        lora.z[route * lora.r + i] = acc * route_scale(lora, route, t, i);
      }
    }
  }
  std::vector<T> wrow(K);
  for (int o = 0; o < N; ++o) {
    const int64_t row = static_cast<int64_t>(o) * K;  // K % 32 == 0: whole chunks
    for (int c = 0; c < K / kChunk; ++c)
      nf4_decode_chunk(w + (row + c * kChunk) / 2, sc.block((row + c * kChunk) / sc.blocksize),
                       wrow.data() + c * kChunk);
    for (int t = 0; t < T_; ++t) {
      float acc = 0.f;
      for (int c = 0; c < K; ++c)
        acc += to_float(wrow[c]) * to_float(x[static_cast<int64_t>(t) * K + c]);
      for (int idx = 0; idx < lora.k * lora.r; ++idx) {
        const int j = idx / lora.r, i = idx % lora.r, e = expert_of(lora, t * lora.k + j);
        acc += lora.z[t * lora.k * lora.r + idx] *
               to_float(B[(static_cast<int64_t>(e) * N + o) * lora.r + i]);
      }
      const float bv = bias != nullptr ? to_float(bias[o]) : 0.f;
      y[static_cast<int64_t>(t) * N + o] = from_float<T>(acc + bv);
    }
  }
}

}  // namespace

cudaError_t dequantize_nf4_cuda(const uint8_t* data, const NF4Scales& sc, void* out, DType dt,
                                int64_t n, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return launch_dequant(data, sc, static_cast<float*>(out), n, stream);
    case DType::kFloat16: return launch_dequant(data, sc, static_cast<__half*>(out), n, stream);
    case DType::kBFloat16:
      return launch_dequant(data, sc, static_cast<__nv_bfloat16*>(out), n, stream);
  }
  return cudaErrorInvalidValue;
}

void dequantize_nf4_host(const uint8_t* data, const NF4Scales& sc, void* out, DType dt,
                         int64_t n) {
  switch (dt) {
    case DType::kFloat32: dequant_host(data, sc, static_cast<float*>(out), n); break;
    case DType::kFloat16: dequant_host(data, sc, static_cast<__half*>(out), n); break;
    case DType::kBFloat16: dequant_host(data, sc, static_cast<__nv_bfloat16*>(out), n); break;
  }
}

cudaError_t nf4_molora_decode_cuda(const void* x, const uint8_t* w, const NF4Scales& sc,
                                   const void* bias, const MoLoRAArgs& lora, void* y, DType dt,
                                   int T, int K, int N, int* workspace, cudaStream_t stream) {
  if (dt == DType::kFloat16)
    return launch_decode(static_cast<const __half*>(x), w, sc, static_cast<const __half*>(bias),
                         lora, static_cast<__half*>(y), T, K, N, workspace, stream);
  if (dt == DType::kBFloat16)
    return launch_decode(static_cast<const __nv_bfloat16*>(x), w, sc,
                         static_cast<const __nv_bfloat16*>(bias), lora,
                         static_cast<__nv_bfloat16*>(y), T, K, N, workspace, stream);
  return cudaErrorInvalidValue;
}

void nf4_molora_decode_host(const void* x, const uint8_t* w, const NF4Scales& sc,
                            const void* bias, const MoLoRAArgs& lora, void* y, DType dt, int T,
                            int K, int N) {
  if (dt == DType::kFloat16)
    decode_host(static_cast<const __half*>(x), w, sc, static_cast<const __half*>(bias), lora,
                static_cast<__half*>(y), T, K, N);
  else if (dt == DType::kBFloat16)
    decode_host(static_cast<const __nv_bfloat16*>(x), w, sc,
                static_cast<const __nv_bfloat16*>(bias), lora, static_cast<__nv_bfloat16*>(y),
                T, K, N);
}

}  // namespace datalora
