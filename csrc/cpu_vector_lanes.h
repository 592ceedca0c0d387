// Vector pieces shared by the CPU kernels (rows: cpu_loss_kernel.h, windows
// of frames: cpu_sequence_kernel.h): the Lanes<> of loss_math.h for ATen's
// Vectorized<>, the loads and stores of one step (Io<>), the gradient storage
// rule and the chunk sizes that make the sums deterministic.
//
// Like the kernels, this header is compiled once per instruction set: include
// it only from a kernel header, after CPU_CAPABILITY (and, for AVX2, the
// target pragma) is set.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_vector_lanes.h"
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "loss_math.h"

namespace koemorph_fused {

// Vector lanes for the shared formulas of loss_math.h.
template <class T>
struct Lanes<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // k * sign(x) without the multiply, for k >= 0: k with the sign bit of x,
  // kept where x is neither 0 nor NaN (an ordered "not equal" lane mask).
  static KF_HD V scaled_sign(const V& x, const V& k) {
    const V sign_bit(T(-0.0));
    return ordered_nonzero(x) & ((x & sign_bit) | k);
  }
  static KF_HD V abs(const V& x) { return x.abs(); }
  // (k != 0) is an all-ones / all-zeros lane mask: AND keeps v or gives +0.
  static KF_HD V keep_nonzero(const V& k, const V& v) { return (k != V(T(0))) & v; }

 private:
  // All-ones lanes where x != 0 and x is not NaN.
  static KF_HD V ordered_nonzero(const V& x) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_OQ);
    if constexpr (std::is_same_v<T, double>) return _mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_NEQ_OQ);
#endif
    const V zero(T(0));
    return (x > zero) | (x < zero);  // ordered comparisons: NaN gives 0 in both
  }
};

namespace cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Work is grouped into chunks of about this many elements. Partial sums are
// per chunk, so float32 accumulation runs over at most this many values.
constexpr int64_t kChunkElements = 4096;
// Threads are only woken when each gets at least this many elements.
constexpr int64_t kMinElementsPerThread = 16384;
// Contiguous inputs whose column pattern repeats within this many elements
// (lcm(C, step)) take a flat path (rows, or runs of full frames); its
// per-period arrays stay in L1.
constexpr int64_t kMaxFlatPeriod = 1024;

// Where the gradients are kept between forward and backward: float32 for
// float16 inputs, whose narrow exponent range would flush small gradients
// (they scale as 1/N) to zero before grad_output, e.g. a GradScaler's factor,
// is applied; the input dtype otherwise. Backward writes the input dtype.
template <typename scalar_t>
using grad_storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, float, scalar_t>;

// Whether this build has non-temporal stores: without them the callers
// drop their streaming branch at compile time.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveStreamingStores = true;
#else
constexpr bool kHaveStreamingStores = false;
#endif

// A call that moves more than this many bytes (the inputs it reads and the
// gradients it writes) writes the bulk of its gradients with
// store_streaming: twice the last-level cache of this project's machine
// (32 MiB), so that nothing it writes would still be cached for the next
// reader. Smaller calls keep plain stores: just above the cache, streaming
// did not pay (docs/performance.md, "Streaming stores").
constexpr int64_t kStreamingStoreBytes = int64_t(64) << 20;

// The bytes of one whole step's store of one vector (an AVX2 register), and
// the alignment store_streaming needs.
constexpr int64_t kStreamAlignment = 32;

// Whether a call of n elements that reads `inputs` tensors of scalar_t and
// writes `grads` gradients streams them: the one rule of both kernels.
template <typename scalar_t>
bool streams_gradients(int64_t n, int inputs, int grads) {
  const int64_t bytes = n * (static_cast<int64_t>(sizeof(scalar_t)) * inputs +
                             static_cast<int64_t>(sizeof(grad_storage_t<scalar_t>)) * grads);
  return kHaveStreamingStores && grads > 0 && bytes > kStreamingStoreBytes;
}

// Loads and stores of one "step": Vectorized<scalar_t>::size() elements,
// held as one or two vectors of the accumulation type, from and to memory of
// the input type or of the accumulation type.
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int64_t kStep = SVec::size();
  static constexpr int kParts = static_cast<int>(kStep / AVec::size());
  using Pack = std::array<AVec, kParts>;

  template <typename mem_t>
  static KF_HD Pack load(const mem_t* p, int64_t count) {
    if constexpr (std::is_same_v<mem_t, acc_t>) {
      Pack out;
      for (int j = 0; j < kParts; ++j) {
        const int64_t n = std::clamp<int64_t>(count - j * AVec::size(), 0, AVec::size());
        out[j] = n == AVec::size() ? AVec::loadu(p + j * AVec::size())
                 : n > 0          ? AVec::loadu(p + j * AVec::size(), n)
                                  : AVec(acc_t(0));
      }
      return out;
    } else {
      static_assert(std::is_same_v<mem_t, scalar_t> && kParts == 2, "reduced-precision memory");
      const SVec v = count == kStep ? SVec::loadu(p) : SVec::loadu(p, count);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
      return {lo, hi};
    }
  }

  template <typename mem_t>
  static KF_HD void store(mem_t* p, const Pack& v, int64_t count) {
    if constexpr (std::is_same_v<mem_t, acc_t>) {
      for (int j = 0; j < kParts; ++j) {
        const int64_t n = std::clamp<int64_t>(count - j * AVec::size(), 0, AVec::size());
        if (n == AVec::size()) v[j].store(p + j * AVec::size());
        else if (n > 0) v[j].store(p + j * AVec::size(), n);
      }
    } else {
      static_assert(std::is_same_v<mem_t, scalar_t> && kParts == 2, "reduced-precision memory");
      const SVec h = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      if (count == kStep) h.store(p); else h.store(p, count);
    }
  }

  // A whole step to 32-byte-aligned memory with non-temporal stores: they
  // write past the caches, where a plain store first reads the line it fills
  // (moving its bytes twice). store_fence() orders them before the results
  // are handed on. Plain stores where the instruction set has none.
  template <typename mem_t>
  static KF_HD void store_streaming(mem_t* p, const Pack& v) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<mem_t, float>) {
      for (int j = 0; j < kParts; ++j) _mm256_stream_ps(p + j * 8, v[j]);
      return;
    } else if constexpr (std::is_same_v<mem_t, double>) {
      _mm256_stream_pd(p, v[0]);
      return;
    } else {
      static_assert(std::is_same_v<mem_t, scalar_t> && kParts == 2, "reduced-precision memory");
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<scalar_t>(v[0], v[1]));
      return;
    }
#endif
    store(p, v, kStep);
  }

  // A gradient step: streamed when `stream` and the step is whole, a plain
  // store otherwise (and always in a build without streaming stores).
  template <typename mem_t>
  static KF_HD void store_gradient(mem_t* p, const Pack& v, int64_t count, bool stream) {
    if constexpr (kHaveStreamingStores) {
      if (stream && count == kStep) return store_streaming(p, v);
    }
    store(p, v, count);
  }
};

// The sequence kernel's flat runs that stream their gradients also read their
// inputs past the outer caches: a non-temporal prefetch this far ahead of each
// load brings the line into L1 only, so the tens of megabytes such a call
// reads evict less of what its caller (Python, autograd) touches next
// (docs/performance.md, "Fewer operations per element, and a non-temporal
// prefetch"; the row kernel measured no gain and has none).
constexpr int64_t kPrefetchBytes = 1024;
// Measured at C = 52 only; kept to frames that leave L1 room (FlatView::prefetch).
constexpr int64_t kPrefetchMaxFrameBytes = 2048;

// The line kPrefetchBytes past element `offset` of p. The address may lie
// past the tensor's end (a prefetch never faults), so it is computed as an
// integer, not as a pointer the language would not allow.
template <class T>
KF_HD void prefetch_streaming(const T* p, int64_t offset) {
#if defined(CPU_CAPABILITY_AVX2)
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(offset) * sizeof(T) + kPrefetchBytes;
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_NTA);
#endif
}

// Orders the non-temporal stores of store_streaming before later stores (and
// the thread's hand-over of its results).
inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// n zeros from p on; with `stream`, non-temporal stores from p's first
// 32-byte boundary to the last one (store_fence() orders them too).
template <class T>
void store_zeros(T* p, int64_t n, bool stream) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    while (i < n && reinterpret_cast<uintptr_t>(p + i) % kStreamAlignment != 0) p[i++] = T(0);
    constexpr int64_t kPer = kStreamAlignment / sizeof(T);
    for (; i + kPer <= n; i += kPer) _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i), _mm256_setzero_si256());
  }
#endif
  std::fill(p + i, p + n, T(0));
}

// p may take store_streaming (nullptr: nothing to store, so it may).
template <class T>
bool streamable(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % kStreamAlignment == 0;
}

// The unsigned integer type of the size of T (for lane masks).
template <class T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;

// n values, zero-initialised: on the stack when n <= kInline, else on the heap.
template <class T, int64_t kInline>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(int64_t n) {
    if (n > kInline) {
      heap_.assign(static_cast<size_t>(n), T(0));
      data_ = heap_.data();
    } else {
      std::fill(local_, local_ + n, T(0));
    }
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  alignas(64) T local_[kInline];
  std::vector<T> heap_;
  T* data_ = local_;
};

template <class AVec>
double horizontal_sum(const AVec& v) {
  using T = typename AVec::value_type;
  alignas(64) T lanes[AVec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < AVec::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

}  // namespace cpu::CPU_CAPABILITY
}  // namespace koemorph_fused
