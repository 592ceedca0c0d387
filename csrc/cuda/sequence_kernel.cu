// CUDA implementation of koemorph_fused::sequence_loss_forward: windows of
// frames (B, T, C) (docs/spec.md, "Sequences"; docs/design.md, "Sequences on
// CUDA").
//
// Three launches on the current stream, no host synchronisation:
//
//   1. frame_info_kernel, over the B*T frames: one flag byte per frame (in V,
//      in P, in P_v) from lengths / mask / continuity, and the counts |V|, |P|,
//      |P_v| (block partials added in block order by the last block). It also
//      writes the `counts` output. Without lengths, mask and continuity every
//      flag follows from t alone: one thread writes the counts the host
//      computed and the other kernels derive the flags themselves.
//   2a. reductions mean / sum: sequence_kernel. A work item is (window b, a
//      chunk of consecutive frames [t0, t1), a group of V columns); its thread
//      walks the frames in order, so pred[b, t-1] / target[b, t-1] are the
//      previous iteration's registers (t0 - 1 is read once, in place; t = 0
//      reads prev / prev_target). The velocity term of frame t adds to the
//      gradient of frame t-1, so a frame's gradient is stored one iteration
//      later, and a chunk's last frame looks at the first frame of the next
//      chunk: every gradient element is written exactly once, by one thread.
//      The denominators of "mean" are the pre-kernel's counts (or `counts`),
//      read from device memory before any gradient is written. Six sums are
//      finished by grid_sum (cuda_utils.cuh): deterministic, no float atomics.
//   2b. reduction none: frame_terms_kernel, one warp per frame, the six
//      per-frame values from a fixed shuffle tree; no gradients.
//
// The per-element formulas are loss_math.h's (the row kernel's), on scalars.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "loss_inputs.h"
#include "loss_math.h"

namespace koemorph_fused {
namespace gpu {
namespace {

// The six sequence terms: the five of loss_terms.h, then velocity.
constexpr int kVelocity = kNumTerms;
constexpr int kSequenceTerms = kNumTerms + 1;

enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

// Frame flags: in V, in P (temporal), in P_v (velocity). P_v is a subset of P,
// P of V.
constexpr uint8_t kInV = 1;
constexpr uint8_t kInP = 2;
constexpr uint8_t kInPv = 4;

// Sequence blocks per SM that ptxas must allow (at most 128 registers).
constexpr int kSequenceMinBlocks = 2;
// Frames per work item at least (when T allows): a chunk reads one frame
// before it and one after it besides its own.
constexpr int64_t kMinChunkFrames = 4;

// Workspace, 8-byte slots: [counter | |V| |P| |P_v| | partials... | flags].
constexpr int64_t kCounterSlot = 0;
constexpr int64_t kCountSlot = 1;
constexpr int64_t kPartialsSlot = 4;

// ---------------------------------------------------------------------------
// Frame tensors (lengths, mask, continuity) of any dtype the row kernel's
// mask pre-kernel reads, read in place with their strides.

enum FrameDtype : int {
#define KF_ENUM(ctype, name) kFrame##name,
  KF_FOR_EACH_DIRECT_MASK_DTYPE(KF_ENUM)
#undef KF_ENUM
};

struct FrameTensor {
  const void* data = nullptr;  // nullptr: absent
  int64_t stride_b = 0, stride_t = 0;
  int dtype = 0;  // FrameDtype
};

// The value at (b, t) as a double (exact for lengths below 2^53).
__device__ __forceinline__ double read_value(const FrameTensor& x, int64_t b, int64_t t) {
  const int64_t i = b * x.stride_b + t * x.stride_t;
  switch (x.dtype) {
#define KF_CASE(ctype, name) \
  case kFrame##name:         \
    return static_cast<double>(static_cast<const ctype*>(x.data)[i]);
    KF_FOR_EACH_DIRECT_MASK_DTYPE(KF_CASE)
#undef KF_CASE
  }
  return 0.0;
}

__device__ __forceinline__ bool nonzero_at(const FrameTensor& x, int64_t b, int64_t t) {
  return read_value(x, b, t) != 0.0;  // NaN counts as nonzero, as torch's `!= 0`
}

struct FrameInfoParams {
  int64_t B, T;
  FrameTensor lengths;     // (B,): frames t < lengths[b] are valid
  FrameTensor mask;        // (B, T): nonzero = valid
  FrameTensor continuity;  // (B,) (stride_t = 0, read at t = 0 only) or (B, T)
  bool continuity_per_frame;
  bool has_prev, has_prev_target, has_raw;
  uint8_t* flags;          // (B*T); nullptr: no frame tensor, `analytic` holds the counts
  double analytic[3];      // |V|, |P|, |P_v| without frame tensors
  double* workspace;
  int64_t* counts_out;     // (6,)
};

__device__ __forceinline__ bool frame_valid(const FrameInfoParams& p, int64_t b, int64_t t) {
  if (p.lengths.data) {
    // t < n also clamps n into [0, T].
    return static_cast<double>(t) < read_value(p.lengths, b, 0);
  }
  return p.mask.data ? nonzero_at(p.mask, b, t) : true;
}

__device__ __forceinline__ bool frame_continues(const FrameInfoParams& p, int64_t b, int64_t t) {
  if (!p.continuity.data) return true;
  if (p.continuity_per_frame) return nonzero_at(p.continuity, b, t);
  return t > 0 || nonzero_at(p.continuity, b, 0);
}

__global__ void __launch_bounds__(kThreads) frame_info_kernel(const FrameInfoParams p) {
  double n[3] = {0.0, 0.0, 0.0};
  if (p.flags == nullptr) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      for (int i = 0; i < 3; ++i) n[i] = p.analytic[i];
    } else {
      return;
    }
  } else {
    const int64_t frames = p.B * p.T;
    const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < frames; i += step) {
      const int64_t b = i / p.T, t = i - b * p.T;
      const bool valid = frame_valid(p, b, t);
      const bool pair = valid && frame_continues(p, b, t) &&
                        (t > 0 ? frame_valid(p, b, t - 1) : p.has_prev);
      const bool vpair = pair && (t > 0 || p.has_prev_target);
      p.flags[i] = static_cast<uint8_t>((valid ? kInV : 0) | (pair ? kInP : 0) | (vpair ? kInPv : 0));
      n[0] += valid;
      n[1] += pair;
      n[2] += vpair;
    }
    auto* counter = reinterpret_cast<unsigned int*>(p.workspace + kCounterSlot);
    if (!grid_sum<3>(n, p.workspace + kPartialsSlot, counter) || threadIdx.x != 0) return;
  }
  // Thread 0 of the last block (or the only thread): the exact counts (< 2^53).
  for (int i = 0; i < 3; ++i) p.workspace[kCountSlot + i] = n[i];
  const int64_t v = static_cast<int64_t>(n[0]);
  p.counts_out[kMse] = v;
  p.counts_out[kL1] = v;
  p.counts_out[kPerceptual] = v;
  p.counts_out[kTemporal] = static_cast<int64_t>(n[1]);
  p.counts_out[kSmoothing] = p.has_raw ? v : 0;
  p.counts_out[kVelocity] = static_cast<int64_t>(n[2]);
}

// ---------------------------------------------------------------------------
// The loss kernels.

// (B, T, C) operand read in place: element (b, t, c) at b*sb + t*st + c*sc.
template <typename T>
struct Windows {
  const T* data = nullptr;  // nullptr: absent
  int64_t sb = 0, st = 0, sc = 0;
};

template <typename scalar_t, typename grad_t>
struct SequenceParams {
  using acc_t = at::opmath_type<scalar_t>;
  Windows<scalar_t> pred, target, raw;
  Windows<scalar_t> prev, prev_target;  // (B, C): st unused
  const uint8_t* flags;        // (B*T) from frame_info_kernel; nullptr: derived from t
  bool has_prev, has_prev_target;
  const acc_t* frame_scale;    // (B, T) with strides; nullptr: every frame 1
  int64_t scale_sb, scale_st;
  const acc_t* colw;           // (C,)
  grad_t* grad_pred;           // contiguous (B, T, C); nullptr: not requested
  grad_t* grad_target;
  grad_t* grad_raw;
  int64_t B, T, C;
  int64_t items_per_frame;     // ceil(C / V)
  int64_t chunk_frames;        // frames per work item
  int64_t chunks;              // ceil(T / chunk_frames)
  int64_t reduction;
  double weights[kSequenceTerms];       // host values, used when weights_dev is nullptr
  const double* weights_dev;            // (6,) float64 on the device
  bool counts_given;                    // "mean" divides by these instead of this call's counts
  double counts[kSequenceTerms];        // host values, used when counts_dev is nullptr
  const double* counts_dev;             // (6,) float64 on the device
  double* workspace;
  acc_t* terms;                // (6,), or (B, T, 6) for reduction none
  acc_t* total;                // 0-dim, or (B, T)
};

// As the row kernel: effective_weight() makes a weight that is not finite
// and > 0 (possible only on the device, where it is not checked) count as 0
// in the total and in every gradient.
template <typename P>
__device__ __forceinline__ void load_weights(const P& p, double (&w)[kSequenceTerms]) {
#pragma unroll
  for (int i = 0; i < kSequenceTerms; ++i) {
    w[i] = effective_weight(p.weights_dev ? p.weights_dev[i] : p.weights[i]);
  }
}

// This call's count of each term: |V|, |V|, |V|, |P|, |V| or 0, |P_v|.
template <typename P>
__device__ __forceinline__ double call_count(const P& p, int term) {
  const double* n = p.workspace + kCountSlot;
  switch (term) {
    case kTemporal: return n[1];
    case kSmoothing: return p.raw.data ? n[0] : 0.0;
    case kVelocity: return n[2];
    default: return n[0];
  }
}

// What a term's sum is divided by: max(count, 1) for "mean" (the given count
// when there is one; NaN counts as 1), 1 for "sum".
template <typename P>
__device__ __forceinline__ double denominator(const P& p, int term) {
  if (p.reduction != kReduceMean) return 1.0;
  const double n = !p.counts_given ? call_count(p, term)
                   : p.counts_dev  ? p.counts_dev[term]
                                   : p.counts[term];
  return n >= 1.0 ? n : 1.0;
}

template <typename P>
__device__ __forceinline__ uint8_t frame_flags(const P& p, int64_t b, int64_t t) {
  if (p.flags) return p.flags[b * p.T + t];
  const bool pair = t > 0 || p.has_prev;
  const bool vpair = t > 0 || (p.has_prev && p.has_prev_target);
  return static_cast<uint8_t>(kInV | (pair ? kInP : 0) | (vpair ? kInPv : 0));
}

template <typename P, typename acc_t>
__device__ __forceinline__ acc_t frame_scale(const P& p, int64_t b, int64_t t) {
  return p.frame_scale ? p.frame_scale[b * p.scale_sb + t * p.scale_st] : acc_t(1);
}

// V elements of one frame from column c0 (n of them valid): one vector
// access when V > 1 (then sc == 1), else one strided element.
template <typename T, int V>
__device__ __forceinline__ void load_frame(const Windows<T>& x, int64_t b, int64_t t, int64_t c0,
                                           int n, T (&out)[V]) {
  const T* row = x.data + b * x.sb + t * x.st;
  if constexpr (V == 1) {
    out[0] = row[c0 * x.sc];
  } else {
    load_items<T, V>(row + c0, n, out);
  }
}

// prev / prev_target: (B, C).
template <typename T, int V>
__device__ __forceinline__ void load_window_start(const Windows<T>& x, int64_t b, int64_t c0, int n,
                                                  T (&out)[V]) {
  const T* row = x.data + b * x.sb;
  if constexpr (V == 1) {
    out[0] = row[c0 * x.sc];
  } else {
    load_items<T, V>(row + c0, n, out);
  }
}

template <typename acc_t, typename grad_t, int V>
__device__ __forceinline__ void store_gradient(grad_t* out, int64_t offset, int n, const acc_t (&g)[V]) {
  if (out == nullptr) return;
  grad_t x[V];
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = static_cast<grad_t>(g[j]);
  store_items<grad_t, V>(out + offset, n, x);
}

// Reductions mean and sum: the six sums and the requested gradients.
template <typename scalar_t, typename grad_t, int V, bool kHasRaw>
__global__ void __launch_bounds__(kThreads, kSequenceMinBlocks)
    sequence_kernel(const SequenceParams<scalar_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = SequenceParams<scalar_t, grad_t>;

  // Gradient coefficients: each term's weight over its denominator, then the
  // row kernel's per-element coefficients for one row of C columns.
  GradCoefficients<acc_t> k;
  acc_t kv;  // 2 * w_velocity / (C * denominator)
  {
    double w[kSequenceTerms];
    load_weights(p, w);
    for (int i = 0; i < kSequenceTerms; ++i) w[i] /= denominator(p, i);
    k = make_coefficients<acc_t>(w, 1, p.C);
    kv = static_cast<acc_t>(2.0 * w[kVelocity] / static_cast<double>(p.C));
  }
  // The velocity of a chunk's first frame after it moves the chunk's last
  // frame: looked at only when that gradient can be nonzero.
  const bool look_ahead = (p.grad_pred || p.grad_target) && kv != acc_t(0);

  LaneSums<acc_t> acc{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  acc_t velocity = acc_t(0);

  const int64_t ipf = p.items_per_frame;
  const int64_t items = p.B * p.chunks * ipf;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; w < items; w += step) {
    const int64_t q = w / ipf;
    const int64_t c0 = (w - q * ipf) * V;
    const int64_t b = q / p.chunks;
    const int64_t t0 = (q - b * p.chunks) * p.chunk_frames;
    const int64_t t1 = std::min(t0 + p.chunk_frames, p.T);
    const int n = static_cast<int>(std::min<int64_t>(V, p.C - c0));

    acc_t cw[V];
#pragma unroll
    for (int j = 0; j < V; ++j) cw[j] = j < n ? p.colw[c0 + j] : acc_t(0);

    // pred / target of the frame before the current one (prev / prev_target
    // before frame 0): read only where frame t0 pairs with it.
    acc_t pp[V], tp[V];
#pragma unroll
    for (int j = 0; j < V; ++j) pp[j] = tp[j] = acc_t(0);
    {
      const uint8_t fl = frame_flags(p, b, t0);
      if (fl & kInP) {
        scalar_t x[V], y[V];
        if (t0 > 0) {
          load_frame<scalar_t, V>(p.pred, b, t0 - 1, c0, n, x);
          load_frame<scalar_t, V>(p.target, b, t0 - 1, c0, n, y);
        } else {
          load_window_start<scalar_t, V>(p.prev, b, c0, n, x);
          if (fl & kInPv) load_window_start<scalar_t, V>(p.prev_target, b, c0, n, y);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          pp[j] = static_cast<acc_t>(x[j]);
          tp[j] = (fl & kInPv) ? static_cast<acc_t>(y[j]) : acc_t(0);
        }
      }
    }

    // Gradients of frame t-1, complete once frame t's velocity is added.
    acc_t held_pred[V], held_target[V];
#pragma unroll
    for (int j = 0; j < V; ++j) held_pred[j] = held_target[j] = acc_t(0);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t fl = frame_flags(p, b, t);
      const bool holding = t > t0;
      acc_t gp[V], gt[V], gr[V];
#pragma unroll
      for (int j = 0; j < V; ++j) gp[j] = gt[j] = gr[j] = acc_t(0);
      if (fl & kInV) {  // frames outside V are never read: their gradients are 0
        const acc_t f = frame_scale<P, acc_t>(p, b, t);
        const bool pair = fl & kInP, vpair = fl & kInPv;
        scalar_t xp[V], xt[V], xr[V];
        load_frame<scalar_t, V>(p.pred, b, t, c0, n, xp);
        load_frame<scalar_t, V>(p.target, b, t, c0, n, xt);
        if constexpr (kHasRaw) load_frame<scalar_t, V>(p.raw, b, t, c0, n, xr);
        LaneSums<acc_t> frame{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        acc_t frame_velocity = acc_t(0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (j < n) {
            const acc_t pj = static_cast<acc_t>(xp[j]);
            const acc_t tj = static_cast<acc_t>(xt[j]);
            const acc_t d = pj - tj;
            // (The coefficient of d is recomputed per element: kept per column
            // it cost V more registers.)
            acc_t g = difference_gradient(d, difference_coefficient(cw[j], k.mse, k.perceptual), k.l1);
            acc_t g_target = -g;
            accumulate_difference(frame, d, cw[j]);
            if (pair) {  // q = pred[b, t-1] (detached) or prev[b]
              const acc_t e = pj - pp[j];
              g = g + Lanes<acc_t>::keep_nonzero(k.temporal, temporal_gradient(e, k.temporal));
              accumulate_temporal(frame, e);
            }
            if (vpair) {  // moves frame t and frame t-1 (not prev)
              const acc_t v = (pj - pp[j]) - (tj - tp[j]);
              const acc_t gv = Lanes<acc_t>::keep_nonzero(kv, temporal_gradient(v, kv));
              g = g + gv;
              g_target = g_target - gv;
              frame_velocity = frame_velocity + v * v;
              if (holding) {
                held_pred[j] = held_pred[j] - f * gv;
                held_target[j] = held_target[j] + f * gv;
              }
            }
            if constexpr (kHasRaw) {
              const acc_t s = pj - static_cast<acc_t>(xr[j]);
              const acc_t gs = smoothing_gradient(s, k.smoothing);
              g = g + gs;
              gr[j] = -(f * gs);
              accumulate_smoothing(frame, s);
            }
            gp[j] = f * g;
            gt[j] = f * g_target;
            pp[j] = pj;
            tp[j] = tj;
          }
        }
        acc.sq = acc.sq + f * frame.sq;
        acc.abs = acc.abs + f * frame.abs;
        acc.perceptual = acc.perceptual + f * frame.perceptual;
        acc.temporal = acc.temporal + f * frame.temporal;
        acc.smoothing = acc.smoothing + f * frame.smoothing;
        velocity = velocity + f * frame_velocity;
      }
      const int64_t out = (b * p.T + t) * p.C + c0;
      if (holding) {
        store_gradient<acc_t, grad_t, V>(p.grad_pred, out - p.C, n, held_pred);
        store_gradient<acc_t, grad_t, V>(p.grad_target, out - p.C, n, held_target);
      }
      if constexpr (kHasRaw) store_gradient<acc_t, grad_t, V>(p.grad_raw, out, n, gr);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        held_pred[j] = gp[j];
        held_target[j] = gt[j];
      }
    }

    // The first frame of the next chunk: its velocity moves frame t1 - 1
    // (then in V, its values in pp / tp).
    if (look_ahead && t1 < p.T) {
      const uint8_t fl = frame_flags(p, b, t1);
      if (fl & kInPv) {
        const acc_t f = frame_scale<P, acc_t>(p, b, t1);
        scalar_t xp[V], xt[V];
        load_frame<scalar_t, V>(p.pred, b, t1, c0, n, xp);
        load_frame<scalar_t, V>(p.target, b, t1, c0, n, xt);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (j < n) {
            const acc_t v = (static_cast<acc_t>(xp[j]) - pp[j]) - (static_cast<acc_t>(xt[j]) - tp[j]);
            const acc_t gv = Lanes<acc_t>::keep_nonzero(kv, temporal_gradient(v, kv));
            held_pred[j] = held_pred[j] - f * gv;
            held_target[j] = held_target[j] + f * gv;
          }
        }
      }
    }
    const int64_t last = (b * p.T + t1 - 1) * p.C + c0;
    store_gradient<acc_t, grad_t, V>(p.grad_pred, last, n, held_pred);
    store_gradient<acc_t, grad_t, V>(p.grad_target, last, n, held_target);
  }

  double sums[kSequenceTerms];
  sums[kMse] = static_cast<double>(acc.sq);
  sums[kL1] = static_cast<double>(acc.abs);
  sums[kPerceptual] = static_cast<double>(acc.perceptual);
  sums[kTemporal] = static_cast<double>(acc.temporal);
  sums[kSmoothing] = static_cast<double>(acc.smoothing);
  sums[kVelocity] = static_cast<double>(velocity);
  auto* counter = reinterpret_cast<unsigned int*>(p.workspace + kCounterSlot);
  if (grid_sum<kSequenceTerms>(sums, p.workspace + kPartialsSlot, counter) && threadIdx.x == 0) {
    // Per-frame terms are means over C columns, except the perceptual one
    // (a sum with the column weights, as the row loss).
    const double cols = static_cast<double>(p.C);
    double w[kSequenceTerms];
    load_weights(p, w);
    double total = 0.0;
    for (int i = 0; i < kSequenceTerms; ++i) {
      const double term = (i == kPerceptual ? sums[i] : sums[i] / cols) / denominator(p, i);
      p.terms[i] = static_cast<acc_t>(term);
      if (w[i] > 0.0) total += w[i] * term;
    }
    *p.total = static_cast<acc_t>(total);
  }
}

// Reduction none: one warp per frame, lanes over the columns (strided reads,
// any layout); terms (B, T, 6) and total (B, T), 0 for frames outside V.
template <typename scalar_t, typename grad_t, bool kHasRaw>
__global__ void __launch_bounds__(kThreads) frame_terms_kernel(const SequenceParams<scalar_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = SequenceParams<scalar_t, grad_t>;
  const int lane = threadIdx.x & 31;
  const int64_t frames = p.B * p.T;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5; i < frames;
       i += step) {
    const int64_t b = i / p.T, t = i - b * p.T;
    const uint8_t fl = frame_flags(p, b, t);  // the same for the whole warp
    const bool pair = fl & kInP, vpair = fl & kInPv;
    double sums[kSequenceTerms] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    if (fl & kInV) {
      const scalar_t* pred = p.pred.data + b * p.pred.sb + t * p.pred.st;
      const scalar_t* target = p.target.data + b * p.target.sb + t * p.target.st;
      // The previous frame: pred / target at t-1, or prev / prev_target.
      const scalar_t* q = !pair ? nullptr
                          : t > 0 ? p.pred.data + b * p.pred.sb + (t - 1) * p.pred.st
                                  : p.prev.data + b * p.prev.sb;
      const int64_t q_sc = t > 0 ? p.pred.sc : p.prev.sc;
      const scalar_t* s = !vpair ? nullptr
                          : t > 0 ? p.target.data + b * p.target.sb + (t - 1) * p.target.st
                                  : p.prev_target.data + b * p.prev_target.sb;
      const int64_t s_sc = t > 0 ? p.target.sc : p.prev_target.sc;
      LaneSums<acc_t> acc{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      acc_t velocity = acc_t(0);
      for (int64_t c = lane; c < p.C; c += 32) {
        const acc_t pc = static_cast<acc_t>(pred[c * p.pred.sc]);
        const acc_t tc = static_cast<acc_t>(target[c * p.target.sc]);
        accumulate_difference(acc, pc - tc, p.colw[c]);
        if (pair) {
          const acc_t e = pc - static_cast<acc_t>(q[c * q_sc]);
          accumulate_temporal(acc, e);
          if (vpair) {
            const acc_t v = e - (tc - static_cast<acc_t>(s[c * s_sc]));
            velocity = velocity + v * v;
          }
        }
        if constexpr (kHasRaw) {
          const scalar_t* raw = p.raw.data + b * p.raw.sb + t * p.raw.st;
          accumulate_smoothing(acc, pc - static_cast<acc_t>(raw[c * p.raw.sc]));
        }
      }
      sums[kMse] = warp_sum(static_cast<double>(acc.sq));
      sums[kL1] = warp_sum(static_cast<double>(acc.abs));
      sums[kPerceptual] = warp_sum(static_cast<double>(acc.perceptual));
      sums[kTemporal] = warp_sum(static_cast<double>(acc.temporal));
      sums[kSmoothing] = warp_sum(static_cast<double>(acc.smoothing));
      sums[kVelocity] = warp_sum(static_cast<double>(velocity));
    }
    if (lane == 0) {
      double w[kSequenceTerms];
      load_weights(p, w);
      const double f = (fl & kInV) ? static_cast<double>(frame_scale<P, acc_t>(p, b, t)) : 0.0;
      const double cols = static_cast<double>(p.C);
      const bool counted[kSequenceTerms] = {true, true, true, pair, kHasRaw, vpair};
      double total = 0.0;
      for (int k = 0; k < kSequenceTerms; ++k) {
        double term = 0.0;
        if ((fl & kInV) && counted[k]) term = f * (k == kPerceptual ? sums[k] : sums[k] / cols);
        p.terms[i * kSequenceTerms + k] = static_cast<acc_t>(term);
        if (w[k] > 0.0) total += w[k] * term;
      }
      p.total[i] = static_cast<acc_t>(total);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: checks, layouts, launches.

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_windows(const at::Tensor& x, const char* name, const at::Tensor& pred) {
  TORCH_CHECK_TYPE(x.scalar_type() == pred.scalar_type(), name, " must have the dtype of pred (",
                   pred.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == pred.device(), name, " must be on the device of pred (", pred.device(),
                    "), got ", x.device());
}

// The FrameDtype of a frame tensor the kernels read directly, or -1.
int frame_dtype(at::ScalarType t) {
  switch (t) {
#define KF_CASE(ctype, name) \
  case at::ScalarType::name: \
    return kFrame##name;
    KF_FOR_EACH_DIRECT_MASK_DTYPE(KF_CASE)
#undef KF_CASE
    default:
      return -1;
  }
}

// A (B,) or (B, T) lengths / mask / continuity tensor on pred's device, read
// in place. Dtypes the kernel does not read are converted first (a device
// kernel, no sync): to int64 for lengths, to `!= 0` for the others.
FrameTensor frame_tensor(const at::Tensor& x, const char* name, const at::Tensor& pred,
                         at::IntArrayRef shape, bool integer, at::Tensor& keep) {
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == pred.device(), name, " must be on the device of pred (",
                    pred.device(), "), got ", x.device());
  if (integer) {
    TORCH_CHECK_TYPE(at::isIntegralType(x.scalar_type(), /*includeBool=*/false), name,
                     " must be an integer tensor, got ", x.scalar_type());
  } else {
    TORCH_CHECK_TYPE(!at::isComplexType(x.scalar_type()), name,
                     " must be a bool, integer or floating tensor, got ", x.scalar_type());
  }
  keep = x;
  if (frame_dtype(x.scalar_type()) < 0) keep = integer ? x.to(at::kLong) : x.ne(0);
  FrameTensor f;
  f.data = keep.numel() > 0 ? keep.const_data_ptr() : nullptr;
  f.stride_b = keep.stride(0);
  f.stride_t = keep.dim() > 1 ? keep.stride(1) : 0;
  f.dtype = frame_dtype(keep.scalar_type());
  return f;
}

template <typename T>
Windows<T> windows_of(const at::Tensor& x) {
  Windows<T> w;
  if (!x.defined()) return w;
  w.data = x.const_data_ptr<T>();
  w.sb = x.stride(0);
  if (x.dim() == 3) {
    w.st = x.stride(1);
    w.sc = x.stride(2);
  } else {
    w.sc = x.stride(1);
  }
  return w;
}

// Whether V-element vectors starting at multiples of V can be read from
// every (b, t) row of x: stride 1 along C, the start and the row strides
// aligned to the access.
template <typename T>
bool windows_aligned(const Windows<T>& x, int64_t B, int64_t T_, int64_t C, int v) {
  if (x.data == nullptr) return true;
  if (C > 1 && x.sc != 1) return false;
  const int64_t elem = sizeof(T), bytes = access_bytes(elem, v);
  if (reinterpret_cast<uintptr_t>(x.data) % bytes != 0) return false;
  return (B == 1 || (x.sb * elem) % bytes == 0) && (T_ == 1 || (x.st * elem) % bytes == 0);
}

template <typename scalar_t, typename grad_t>
bool sequence_vectorizable(const SequenceParams<scalar_t, grad_t>& p, int v) {
  const int64_t gs = sizeof(grad_t), frames = p.B * p.T;
  return windows_aligned(p.pred, p.B, p.T, p.C, v) && windows_aligned(p.target, p.B, p.T, p.C, v) &&
         windows_aligned(p.raw, p.B, p.T, p.C, v) && windows_aligned(p.prev, p.B, 1, p.C, v) &&
         windows_aligned(p.prev_target, p.B, 1, p.C, v) &&
         rows_aligned(p.grad_pred, p.C, frames, gs, v) && rows_aligned(p.grad_target, p.C, frames, gs, v) &&
         rows_aligned(p.grad_raw, p.C, frames, gs, v);
}

template <typename scalar_t, typename grad_t, int V, bool kHasRaw>
int sequence_resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_for_device(cache, [](int) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, sequence_kernel<scalar_t, grad_t, V, kHasRaw>, kThreads, 0));
    return std::min(max_resident_blocks(), multiprocessors() * std::max(1, per_sm));
  });
}

// A launch of sequence_kernel: V, the chunking of T and the grid.
struct SequenceLaunch {
  int v = 1;
  int64_t items_per_frame = 0, chunk_frames = 0, chunks = 0;
  int grid = 0;
};

template <typename scalar_t, typename grad_t, int V, bool kHasRaw>
SequenceLaunch plan_for(const SequenceParams<scalar_t, grad_t>& p) {
  SequenceLaunch s;
  s.v = V;
  s.items_per_frame = ceil_div(p.C, V);
  // About one thread per resident thread slot: T cut into chunks until the
  // work items fill the GPU, each chunk at least kMinChunkFrames long.
  const int resident = sequence_resident_blocks<scalar_t, grad_t, V, kHasRaw>();
  const int64_t wanted = ceil_div(static_cast<int64_t>(resident) * kThreads, p.B * s.items_per_frame);
  const int64_t chunks = std::clamp<int64_t>(wanted, 1, ceil_div(p.T, kMinChunkFrames));
  s.chunk_frames = ceil_div(p.T, chunks);
  s.chunks = ceil_div(p.T, s.chunk_frames);
  const int64_t items = p.B * s.chunks * s.items_per_frame;
  s.grid = static_cast<int>(std::min<int64_t>(ceil_div(items, kThreads), resident));
  return s;
}

template <typename scalar_t, typename grad_t, int V>
SequenceLaunch plan_v(const SequenceParams<scalar_t, grad_t>& p) {
  return p.raw.data ? plan_for<scalar_t, grad_t, V, true>(p) : plan_for<scalar_t, grad_t, V, false>(p);
}

// Columns per work item at most: 4 (2 for float64). A thread keeps about
// eight values per column (the previous frame's pred and target, two held
// gradients, ...): with 8 columns of float16 / bfloat16 ptxas spilled at
// 128 registers.
template <typename scalar_t>
constexpr int kMaxColumns = static_cast<int>(std::min<size_t>(4, 16 / sizeof(scalar_t)));

// kMaxColumns-element vectors where every operand allows them, else half
// that, else scalars.
template <typename scalar_t, typename grad_t>
SequenceLaunch plan_sequence(const SequenceParams<scalar_t, grad_t>& p) {
  constexpr int kV = kMaxColumns<scalar_t>;
  if constexpr (kV >= 2) {
    if (sequence_vectorizable(p, kV)) return plan_v<scalar_t, grad_t, kV>(p);
  }
  if constexpr (kV >= 4) {
    if (sequence_vectorizable(p, kV / 2)) return plan_v<scalar_t, grad_t, kV / 2>(p);
  }
  return plan_v<scalar_t, grad_t, 1>(p);
}

template <typename scalar_t, typename grad_t, int V>
void launch_sequence_v(const SequenceParams<scalar_t, grad_t>& p, int grid, cudaStream_t stream) {
  if (p.raw.data) {
    sequence_kernel<scalar_t, grad_t, V, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    sequence_kernel<scalar_t, grad_t, V, false><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename grad_t>
void launch_sequence(const SequenceParams<scalar_t, grad_t>& p, const SequenceLaunch& s,
                     cudaStream_t stream) {
  constexpr int kV = kMaxColumns<scalar_t>;
  if constexpr (kV >= 2) {
    if (s.v == kV) return launch_sequence_v<scalar_t, grad_t, kV>(p, s.grid, stream);
  }
  if constexpr (kV >= 4) {
    if (s.v == kV / 2) return launch_sequence_v<scalar_t, grad_t, kV / 2>(p, s.grid, stream);
  }
  launch_sequence_v<scalar_t, grad_t, 1>(p, s.grid, stream);
}

// Everything read from the arguments, before the dtype dispatch.
struct SequenceInputs {
  at::Tensor pred, target, raw, prev, prev_target;  // undefined when absent
  at::Tensor lengths, mask, continuity, frame_scale, counts, weights, column_weights;
  FrameInfoParams info{};
  int64_t reduction = 0;
  bool weights_on_host = false, counts_on_host = false;
  std::array<double, kSequenceTerms> weights_host{}, counts_host{};
};

template <typename scalar_t>
void run_sequence(const SequenceInputs& in, SequenceOutputs& outs, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  using grad_t = grad_storage_t<scalar_t>;
  auto& [total, terms, counts, grad_pred, grad_target, grad_raw] = outs;
  for (const at::Tensor* g : {&grad_pred, &grad_target, &grad_raw}) {
    TORCH_CHECK(g->numel() == 0 || g->scalar_type() == c10::CppTypeToScalarType<grad_t>::value,
                "koemorph_fused (CUDA): gradient buffers must be ",
                c10::CppTypeToScalarType<grad_t>::value, ", got ", g->scalar_type());
  }

  SequenceParams<scalar_t, grad_t> p{};
  p.pred = windows_of<scalar_t>(in.pred);
  p.target = windows_of<scalar_t>(in.target);
  p.raw = windows_of<scalar_t>(in.raw);
  p.prev = windows_of<scalar_t>(in.prev);
  p.prev_target = windows_of<scalar_t>(in.prev_target);
  p.has_prev = in.prev.defined();
  p.has_prev_target = in.prev_target.defined();
  if (in.frame_scale.defined()) {
    p.frame_scale = in.frame_scale.const_data_ptr<acc_t>();
    p.scale_sb = in.frame_scale.stride(0);
    p.scale_st = in.frame_scale.stride(1);
  }
  p.colw = in.column_weights.const_data_ptr<acc_t>();
  p.grad_pred = data_or_null<grad_t>(grad_pred);
  p.grad_target = data_or_null<grad_t>(grad_target);
  p.grad_raw = data_or_null<grad_t>(grad_raw);
  p.B = in.pred.size(0);
  p.T = in.pred.size(1);
  p.C = in.pred.size(2);
  p.reduction = in.reduction;
  for (int i = 0; i < kSequenceTerms; ++i) {
    p.weights[i] = in.weights_host[i];
    p.counts[i] = in.counts_host[i];
  }
  p.weights_dev = in.weights_on_host ? nullptr : in.weights.const_data_ptr<double>();
  p.counts_given = in.counts.defined();
  p.counts_dev = p.counts_given && !in.counts_on_host ? in.counts.const_data_ptr<double>() : nullptr;
  p.terms = terms.mutable_data_ptr<acc_t>();
  p.total = total.mutable_data_ptr<acc_t>();

  FrameInfoParams info = in.info;
  const int64_t frames = p.B * p.T;
  const bool with_flags = info.lengths.data || info.mask.data || info.continuity.data;
  const int info_grid =
      with_flags ? static_cast<int>(std::min<int64_t>(ceil_div(frames, kThreads * 16), max_resident_blocks()))
                 : 1;
  const bool per_frame = in.reduction == kReduceNone;
  SequenceLaunch launch;
  int grid = 0;
  if (per_frame) {
    grid = static_cast<int>(std::min<int64_t>(ceil_div(frames, kWarps), max_resident_blocks()));
  } else {
    launch = plan_sequence(p);
    p.items_per_frame = launch.items_per_frame;
    p.chunk_frames = launch.chunk_frames;
    p.chunks = launch.chunks;
    grid = launch.grid;
  }

  // 8-byte slots; the frame flags take the slots after the partials.
  const int64_t partials = std::max<int64_t>(per_frame ? 0 : int64_t(grid) * kSequenceTerms, info_grid * 3);
  const int64_t flag_slots = with_flags ? ceil_div(frames, 8) : 0;
  const at::Tensor workspace =
      at::empty({kPartialsSlot + partials + flag_slots}, in.pred.options().dtype(at::kDouble));
  p.workspace = workspace.mutable_data_ptr<double>();
  C10_CUDA_CHECK(cudaMemsetAsync(p.workspace + kCounterSlot, 0, sizeof(double), stream));
  p.flags = with_flags ? reinterpret_cast<uint8_t*>(p.workspace + kPartialsSlot + partials) : nullptr;

  info.flags = const_cast<uint8_t*>(p.flags);
  info.workspace = p.workspace;
  info.counts_out = counts.mutable_data_ptr<int64_t>();
  frame_info_kernel<<<info_grid, kThreads, 0, stream>>>(info);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (per_frame) {
    if (p.raw.data) {
      frame_terms_kernel<scalar_t, grad_t, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      frame_terms_kernel<scalar_t, grad_t, false><<<grid, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    launch_sequence<scalar_t, grad_t>(p, launch, stream);
  }
}

// A (6,) float64 tensor of weights or counts: contiguous float64 on the CPU
// (values copied into `host`) or on pred's device (read by the kernels).
at::Tensor six_values(const at::Tensor& x, const char* name, const at::Tensor& pred, bool& on_host,
                      std::array<double, kSequenceTerms>& host) {
  TORCH_CHECK_VALUE(x.dim() == 1 && x.numel() == kSequenceTerms, name, " must have shape (",
                    kSequenceTerms, ",) (mse, l1, perceptual, temporal, smoothing, velocity), got ",
                    x.sizes());
  TORCH_CHECK_TYPE(!at::isComplexType(x.scalar_type()) && x.scalar_type() != at::kBool, name,
                   " must be a real tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_cpu() || x.device() == pred.device(), name,
                    " must be on the CPU or on the device of pred (", pred.device(), "), got ", x.device());
  at::Tensor d = x.scalar_type() == at::kDouble && x.is_contiguous() ? x : x.to(at::kDouble).contiguous();
  on_host = d.is_cpu();
  if (on_host) {
    const double* v = d.const_data_ptr<double>();
    for (int i = 0; i < kSequenceTerms; ++i) host[i] = v[i];
  }
  return d;
}

SequenceOutputs sequence_loss_forward_cuda(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& raw,
    const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev_target,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& continuity, const at::Tensor& column_weights,
    const at::Tensor& weights, const std::optional<at::Tensor>& counts,
    const std::optional<at::Tensor>& frame_scale, int64_t reduction, bool grad_pred, bool grad_target,
    bool grad_raw) {
  TORCH_CHECK_VALUE(pred.is_cuda(), "pred must be a CUDA tensor here, got ", pred.device());
  const c10::cuda::CUDAGuard guard(pred.device());
  TORCH_CHECK_TYPE(is_supported_dtype(pred.scalar_type()),
                   "pred must be float16, bfloat16, float32 or float64, got ", pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "pred must have shape (B, T, C), got ", pred.sizes());
  TORCH_CHECK_VALUE(pred.size(2) > 0, "pred must have at least one column (C > 0), got shape ",
                    pred.sizes());
  TORCH_CHECK_VALUE(reduction == kReduceNone || reduction == kReduceMean || reduction == kReduceSum,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const int64_t B = pred.size(0), T = pred.size(1), C = pred.size(2);
  const at::ScalarType acc = accumulation_dtype(pred.scalar_type());

  SequenceInputs in;
  in.reduction = reduction;
  in.pred = pred;
  check_windows(target, "target", pred);
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "target must have the shape of pred ", pred.sizes(),
                    ", got ", target.sizes());
  in.target = target;
  if (raw) {
    check_windows(*raw, "raw", pred);
    TORCH_CHECK_VALUE(raw->sizes() == pred.sizes(), "raw must have the shape of pred ", pred.sizes(),
                      ", got ", raw->sizes());
    in.raw = *raw;
  }
  TORCH_CHECK_VALUE(!prev_target || prev, "prev_target needs prev");
  auto window_start = [&](const std::optional<at::Tensor>& x, const char* name) {
    if (!x) return at::Tensor();
    check_windows(*x, name, pred);
    TORCH_CHECK_VALUE(x->dim() == 2 && x->size(0) == B && x->size(1) == C, name,
                      " must have shape (B, C) = (", B, ", ", C, "), got ", x->sizes());
    return *x;
  };
  in.prev = window_start(prev, "prev");
  in.prev_target = window_start(prev_target, "prev_target");

  TORCH_CHECK_VALUE(!(lengths && mask), "give lengths or mask, not both");
  FrameInfoParams& info = in.info;
  info.B = B;
  info.T = T;
  info.has_prev = prev.has_value();
  info.has_prev_target = prev_target.has_value();
  info.has_raw = raw.has_value();
  if (lengths) {
    // Not read on the host (no sync): the kernel's t < lengths[b] clamps it into [0, T].
    info.lengths = frame_tensor(*lengths, "lengths", pred, {B}, /*integer=*/true, in.lengths);
  }
  if (mask) info.mask = frame_tensor(*mask, "mask", pred, {B, T}, false, in.mask);
  if (continuity) {
    TORCH_CHECK_VALUE(continuity->dim() == 1 || continuity->dim() == 2,
                      "continuity must have shape (B,) or (B, T), got ", continuity->sizes());
    info.continuity_per_frame = continuity->dim() == 2;
    info.continuity = frame_tensor(*continuity, "continuity", pred,
                                   info.continuity_per_frame ? at::IntArrayRef{B, T} : at::IntArrayRef{B},
                                   false, in.continuity);
  }
  // Every frame valid: the counts follow from the shape.
  const double frames = static_cast<double>(B) * static_cast<double>(T);
  const double first_frames = static_cast<double>(B);
  info.analytic[0] = frames;
  info.analytic[1] = T > 0 ? frames - (info.has_prev ? 0.0 : first_frames) : 0.0;
  info.analytic[2] = T > 0 ? frames - (info.has_prev && info.has_prev_target ? 0.0 : first_frames) : 0.0;

  TORCH_CHECK_VALUE(column_weights.dim() == 1 && column_weights.size(0) == C,
                    "column_weights must have shape (", C, ",), got ", column_weights.sizes());
  TORCH_CHECK_TYPE(column_weights.scalar_type() == acc, "column_weights must be ", acc, ", got ",
                   column_weights.scalar_type());
  TORCH_CHECK_VALUE(column_weights.device() == pred.device(),
                    "column_weights must be on the device of pred (", pred.device(), "), got ",
                    column_weights.device());
  in.column_weights = column_weights.contiguous();

  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be floating, got ",
                   weights.scalar_type());
  in.weights = six_values(weights, "weights", pred, in.weights_on_host, in.weights_host);
  if (in.weights_on_host) {
    for (int i = 0; i < kSequenceTerms; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(in.weights_host[i]) && in.weights_host[i] >= 0.0,
                        "weights must be finite and >= 0, got weights[", i, "] = ", in.weights_host[i]);
    }
  }
  if (counts) {
    TORCH_CHECK_VALUE(reduction == kReduceMean, "counts can only be given with reduction 1 (mean)");
    in.counts = six_values(*counts, "counts", pred, in.counts_on_host, in.counts_host);
  }
  if (frame_scale) {
    TORCH_CHECK_VALUE(frame_scale->sizes() == at::IntArrayRef({B, T}), "frame_scale must have shape (B, T) = (",
                      B, ", ", T, "), got ", frame_scale->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(frame_scale->scalar_type()), "frame_scale must be floating, got ",
                     frame_scale->scalar_type());
    TORCH_CHECK_VALUE(frame_scale->device() == pred.device(), "frame_scale must be on the device of pred (",
                      pred.device(), "), got ", frame_scale->device());
    in.frame_scale = frame_scale->scalar_type() == acc ? *frame_scale : frame_scale->to(acc);
  }

  // Outputs: reduction none gives per-frame values and no gradients.
  const bool per_frame = reduction == kReduceNone;
  const at::ScalarType grad_dtype = gradient_storage_dtype(pred.scalar_type());
  const auto options = pred.options();
  auto gradient = [&](bool wanted) {
    return at::empty(wanted && !per_frame ? pred.sizes() : at::IntArrayRef{0}, options.dtype(grad_dtype));
  };
  SequenceOutputs outs{
      per_frame ? at::empty({B, T}, options.dtype(acc)) : at::empty({}, options.dtype(acc)),
      per_frame ? at::empty({B, T, kSequenceTerms}, options.dtype(acc))
                : at::empty({kSequenceTerms}, options.dtype(acc)),
      at::empty({kSequenceTerms}, options.dtype(at::kLong)),
      gradient(grad_pred), gradient(grad_target), gradient(grad_raw && raw.has_value())};

  if (B == 0 || T == 0) {  // no frame: every term, count and gradient 0
    std::get<0>(outs).zero_();
    std::get<1>(outs).zero_();
    std::get<2>(outs).zero_();
    return outs;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (pred.scalar_type()) {
    case at::kFloat: run_sequence<float>(in, outs, stream); break;
    case at::kDouble: run_sequence<double>(in, outs, stream); break;
    case at::kHalf: run_sequence<c10::Half>(in, outs, stream); break;
    case at::kBFloat16: run_sequence<c10::BFloat16>(in, outs, stream); break;
    default: TORCH_CHECK_TYPE(false, "koemorph_fused (CUDA): unsupported dtype ", pred.scalar_type());
  }
  return outs;
}

}  // namespace
}  // namespace gpu

TORCH_LIBRARY_IMPL(koemorph_fused, CUDA, m) {
  m.impl("sequence_loss_forward", &gpu::sequence_loss_forward_cuda);
}

}  // namespace koemorph_fused
