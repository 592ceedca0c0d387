// Building blocks shared by the CUDA kernels (cuda/loss_kernel.cu,
// cuda/sequence_kernel.cu): block size, vector loads and stores, the
// deterministic warp / block / grid reductions, and per-device launch limits.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace koemorph_fused {
namespace gpu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Where the gradients are kept between forward and backward: float32 for
// float16 inputs, else the input type, as gradient_storage_dtype() and the
// CPU kernel (checked against the allocated buffers before any launch).
template <typename scalar_t>
using grad_storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, float, scalar_t>;

// ---------------------------------------------------------------------------
// Raw vector loads and stores of V elements (one or two 16-byte accesses).

template <int B> struct RawBits;
template <> struct RawBits<2> { using type = unsigned short; };
template <> struct RawBits<4> { using type = unsigned int; };
template <> struct RawBits<8> { using type = uint2; };
template <> struct RawBits<16> { using type = uint4; };

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* ptr, T (&out)[V]) {
  constexpr int B = static_cast<int>(sizeof(T)) * V;
  if constexpr (B > 16) {
    static_assert(B % 16 == 0, "vector of more than 16 bytes must be whole 16-byte parts");
#pragma unroll
    for (int h = 0; h < B / 16; ++h) {
      const uint4 bits = reinterpret_cast<const uint4*>(ptr)[h];
      memcpy(reinterpret_cast<char*>(out) + 16 * h, &bits, 16);
    }
  } else {
    using R = typename RawBits<B>::type;
    const R bits = *reinterpret_cast<const R*>(ptr);
    memcpy(out, &bits, B);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* ptr, const T (&in)[V]) {
  constexpr int B = static_cast<int>(sizeof(T)) * V;
  if constexpr (B > 16) {
    static_assert(B % 16 == 0, "vector of more than 16 bytes must be whole 16-byte parts");
#pragma unroll
    for (int h = 0; h < B / 16; ++h) {
      uint4 bits;
      memcpy(&bits, reinterpret_cast<const char*>(in) + 16 * h, 16);
      reinterpret_cast<uint4*>(ptr)[h] = bits;
    }
  } else {
    using R = typename RawBits<B>::type;
    R bits;
    memcpy(&bits, in, B);
    *reinterpret_cast<R*>(ptr) = bits;
  }
}

// n == V: one vector access; else the first n elements one by one.
template <typename T, int V>
__device__ __forceinline__ void load_items(const T* ptr, int n, T (&out)[V]) {
  if (n == V) {
    load_vec<T, V>(ptr, out);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < n) out[j] = ptr[j];
    }
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_items(T* ptr, int n, const T (&in)[V]) {
  if (n == V) {
    store_vec<T, V>(ptr, in);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < n) ptr[j] = in[j];
    }
  }
}

// Bytes of one vector access of V elements of `elem` bytes (16 at most).
inline int64_t access_bytes(int64_t elem, int v) { return std::min<int64_t>(16, elem * v); }

// Whether every row of a (rows, *) operand with row pitch `pitch` elements
// can be read as V-element vectors starting at multiples of V.
inline bool rows_aligned(const void* ptr, int64_t pitch, int64_t rows, int64_t elem, int v) {
  if (ptr == nullptr) return true;
  const int64_t bytes = access_bytes(elem, v);
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) return false;
  return rows == 1 || (pitch * elem) % bytes == 0;
}

// ---------------------------------------------------------------------------
// Deterministic reductions.

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Block sums of v[0..N), valid in thread 0; a fixed tree: warps, then warp 0.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double* smem /* N * kWarps */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * kWarps + warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < kWarps ? smem[i * kWarps + lane] : 0.0);
  }
  __syncthreads();  // smem may be reused
}

// Grid-wide sums of v[0..N): every block publishes its block sums to
// partials[block * N + i]; the last block to arrive adds them in block order.
// Returns true in that block only, where thread 0 holds the totals.
template <int N>
__device__ bool grid_sum(double (&v)[N], double* partials, unsigned int* counter) {
  __shared__ double smem[N * kWarps];
  __shared__ bool is_last;
  block_sum<N>(v, smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) partials[blockIdx.x * N + i] = v[i];
    __threadfence();  // publish the partials before taking a ticket
    const unsigned int ticket = atomicAdd(counter, 1u);
    is_last = ticket == gridDim.x - 1;
    if (is_last) __threadfence();  // and see every other block's partials
  }
  __syncthreads();
  if (!is_last) return false;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = 0.0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreads) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __ldcg(partials + b * N + i);  // L2: not a stale L1 line
  }
  block_sum<N>(v, smem);
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch on this workspace
  return true;
}

// ---------------------------------------------------------------------------
// Host side.

// Per-device values computed once (attribute and occupancy queries: no sync,
// safe under graph capture). Only c10 CUDA headers are used here:
// ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE headers, which a minimal
// toolkit lacks.
constexpr int kMaxDevices = 64;

template <typename F>
int cached_for_device(std::atomic<int> (&cache)[kMaxDevices], F compute) {
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int value = std::max(1, compute(dev));
  if (dev < kMaxDevices) cache[dev].store(value, std::memory_order_relaxed);
  return value;
}

// Multiprocessors of the current device.
int multiprocessors();

// Blocks of kThreads that the current device can hold at once.
int max_resident_blocks();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace gpu
}  // namespace koemorph_fused
