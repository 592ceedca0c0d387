// The CPU kernels of the fused loss, compiled once per instruction set.
//
// Include this from a translation unit that first defines CPU_CAPABILITY
// (DEFAULT or AVX2, plus CPU_CAPABILITY_AVX2 for the latter): ATen's
// Vectorized<> then has that width, and everything here lands in the
// namespace koemorph_fused::cpu::CPU_CAPABILITY, so the builds cannot clash.
//
// Forward is ONE pass over the rows: each element is loaded once, the five
// sums are accumulated and every requested gradient is written. Work is cut
// into chunks of a fixed number of rows whose partial sums are added in chunk
// order, so the result is bitwise the same whatever the thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_loss_kernel.h"
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_loss_kernel_args.h"
#include "loss_math.h"

namespace koemorph_fused {

// Vector lanes for the shared formulas of loss_math.h.
template <class T>
struct Lanes<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // k * sign(x) without the multiply: comparisons give all-ones lane masks,
  // and k (>= 0) is selected by them. NaN compares false both ways -> +0.
  static KF_HD V scaled_sign(const V& x, const V& k) {
    const V zero(T(0));
    return ((x > zero) & k) - ((x < zero) & k);
  }
  static KF_HD V abs(const V& x) { return x.abs(); }
  // (k != 0) is an all-ones / all-zeros lane mask: AND keeps v or gives +0.
  static KF_HD V keep_nonzero(const V& k, const V& v) { return (k != V(T(0))) & v; }
};

namespace cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Rows are grouped into chunks of about this many elements. Partial sums are
// per chunk, so float32 accumulation runs over at most this many values.
constexpr int64_t kChunkElements = 4096;
// Threads are only woken when each gets at least this many elements.
constexpr int64_t kMinElementsPerThread = 16384;

// Where the gradients are kept between forward and backward: float32 for
// float16 inputs, whose narrow exponent range would flush small gradients
// (they scale as 1/N) to zero before grad_output, e.g. a GradScaler's factor,
// is applied; the input dtype otherwise. Backward writes the input dtype.
template <typename scalar_t>
using grad_storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, float, scalar_t>;

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
};

template <typename scalar_t>
struct Problem {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;

  const scalar_t *pred, *target, *prev, *raw;
  int64_t pred_stride, target_stride, prev_stride, raw_stride;
  const acc_t* mask;            // nullptr: every m_r is 1
  const acc_t* column_weights;
  grad_storage_t<scalar_t> *grad_pred, *grad_target, *grad_raw;  // nullptr: not requested
  int64_t rows, cols;
  AVec k_mse, k_perceptual, k_l1, k_smoothing;   // GradCoefficients, broadcast
  acc_t temporal_row_scale;     // 2*w_t / (C*denom); a row's coefficient is this * m_r
  bool temporal_grad;           // w_t > 0 (else the temporal term sends no gradient)
  // When C is not a multiple of the step, a row's last step re-reads its
  // final kStep elements; tail_lanes selects the lanes the previous steps
  // had not covered, so that no element is summed twice.
  Pack tail_lanes;
};

// One step of one row: kStep elements from column `col` (fewer, `count`,
// only when the whole row is narrower than a step).
template <typename scalar_t, bool kHasPrev, bool kHasRaw, bool kOverlap>
KF_HD void step(const Problem<scalar_t>& pb, int64_t row, int64_t col, int64_t count,
                 const typename Io<scalar_t>::AVec& row_coef,
                 LaneSums<typename Io<scalar_t>::AVec>& acc) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;

  const Pack p = IO::load(pb.pred + row * pb.pred_stride + col, count);
  const Pack t = IO::load(pb.target + row * pb.target_stride + col, count);
  const Pack cw = IO::load(pb.column_weights + col, count);
  Pack pv{}, rw{};
  if constexpr (kHasPrev) pv = IO::load(pb.prev + row * pb.prev_stride + col, count);
  if constexpr (kHasRaw) rw = IO::load(pb.raw + row * pb.raw_stride + col, count);

  Pack g_pred, g_target, g_raw;
  for (int j = 0; j < IO::kParts; ++j) {
    AVec d = p[j] - t[j];
    const AVec gd =
        difference_gradient(d, difference_coefficient(cw[j], pb.k_mse, pb.k_perceptual), pb.k_l1);
    AVec g = gd;
    g_target[j] = gd.neg();
    AVec e, s;
    if constexpr (kHasPrev) {
      e = p[j] - pv[j];
      if (pb.temporal_grad) g = g + temporal_gradient(e, row_coef);
    }
    if constexpr (kHasRaw) {
      s = p[j] - rw[j];
      const AVec gs = smoothing_gradient(s, pb.k_smoothing);
      g = g + gs;
      g_raw[j] = gs.neg();
    }
    g_pred[j] = g;

    if constexpr (kOverlap) {  // lanes already counted become +0
      d = pb.tail_lanes[j] & d;
      if constexpr (kHasPrev) e = pb.tail_lanes[j] & e;
      if constexpr (kHasRaw) s = pb.tail_lanes[j] & s;
    }
    accumulate_difference(acc, d, cw[j]);
    if constexpr (kHasPrev) accumulate_temporal(acc, e);
    if constexpr (kHasRaw) accumulate_smoothing(acc, s);
  }

  const int64_t out = row * pb.cols + col;
  if (pb.grad_pred) IO::store(pb.grad_pred + out, g_pred, count);
  if (pb.grad_target) IO::store(pb.grad_target + out, g_target, count);
  if constexpr (kHasRaw) {
    if (pb.grad_raw) IO::store(pb.grad_raw + out, g_raw, count);
  }
}

template <class AVec>
double horizontal_sum(const AVec& v) {
  using T = typename AVec::value_type;
  alignas(64) T lanes[AVec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < AVec::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

using ChunkSums = std::array<double, kNumTerms>;

// Rows [r0, r1): the five sums of this block, each element visited once.
template <typename scalar_t, bool kHasPrev, bool kHasRaw>
ChunkSums run_rows(const Problem<scalar_t>& shared, int64_t r0, int64_t r1) {
  // A private copy: the gradient stores below could alias the shared struct
  // (vector types may alias any float), which made the compiler reload every
  // pointer, stride and coefficient from memory at each step.
  const Problem<scalar_t> pb = shared;
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t kStep = IO::kStep;

  const AVec zero(acc_t(0));
  LaneSums<AVec> acc{zero, zero, zero, zero, zero};
  AVec temporal = zero;  // sum_r m_r * sum_c e^2
  const int64_t full_end = pb.cols - pb.cols % kStep;
  const bool overlap_tail = full_end != pb.cols && pb.cols >= kStep;

  for (int64_t r = r0; r < r1; ++r) {
    const acc_t m = pb.mask ? pb.mask[r] : acc_t(1);
    const AVec row_coef(pb.temporal_row_scale * m);
    int64_t c = 0;
    for (; c < full_end; c += kStep) {
      step<scalar_t, kHasPrev, kHasRaw, false>(pb, r, c, kStep, row_coef, acc);
    }
    if (c < pb.cols) {
      if (overlap_tail) {
        step<scalar_t, kHasPrev, kHasRaw, true>(pb, r, pb.cols - kStep, kStep, row_coef, acc);
      } else {
        step<scalar_t, kHasPrev, kHasRaw, false>(pb, r, c, pb.cols - c, row_coef, acc);
      }
    }
    if constexpr (kHasPrev) {
      temporal = temporal + AVec(m) * acc.temporal;
      acc.temporal = zero;
    }
  }
  ChunkSums out;
  out[kMse] = horizontal_sum(acc.sq);
  out[kL1] = horizontal_sum(acc.abs);
  out[kPerceptual] = horizontal_sum(acc.perceptual);
  out[kTemporal] = horizontal_sum(temporal);
  out[kSmoothing] = horizontal_sum(acc.smoothing);
  return out;
}

// sum_r m_r, in a fixed order (eight interleaved partial sums).
template <class acc_t>
double sum_mask(const acc_t* m, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += static_cast<double>(m[i + j]);
  }
  for (; i < n; ++i) s[i % 8] += static_cast<double>(m[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t, bool kHasPrev, bool kHasRaw>
void forward_typed(ForwardArgs& a) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t kStep = IO::kStep;

  Problem<scalar_t> pb;
  pb.pred = static_cast<const scalar_t*>(a.pred);
  pb.target = static_cast<const scalar_t*>(a.target);
  pb.prev = static_cast<const scalar_t*>(a.prev);
  pb.raw = static_cast<const scalar_t*>(a.raw);
  pb.pred_stride = a.pred_stride;
  pb.target_stride = a.target_stride;
  pb.prev_stride = a.prev_stride;
  pb.raw_stride = a.raw_stride;
  pb.mask = static_cast<const acc_t*>(a.mask);
  pb.column_weights = static_cast<const acc_t*>(a.column_weights);
  using grad_t = grad_storage_t<scalar_t>;
  pb.grad_pred = static_cast<grad_t*>(a.grad_pred);
  pb.grad_target = static_cast<grad_t*>(a.grad_target);
  pb.grad_raw = static_cast<grad_t*>(a.grad_raw);
  pb.rows = a.rows;
  pb.cols = a.cols;

  const GradCoefficients<acc_t> k = make_coefficients<acc_t>(a.weights, a.rows, a.cols);
  pb.k_mse = AVec(k.mse);
  pb.k_perceptual = AVec(k.perceptual);
  pb.k_l1 = AVec(k.l1);
  pb.k_smoothing = AVec(k.smoothing);

  a.mask_sum = (kHasPrev && pb.mask) ? sum_mask(pb.mask, a.rows) : static_cast<double>(a.rows);
  pb.temporal_row_scale = static_cast<acc_t>(
      static_cast<double>(k.temporal) / temporal_denominator(a.mask_sum));
  pb.temporal_grad = kHasPrev && a.weights[kTemporal] > 0.0;

  alignas(64) acc_t lanes[kStep];
  const int64_t full_end = a.cols - a.cols % kStep;
  for (int64_t i = 0; i < kStep; ++i) lanes[i] = (a.cols - kStep + i) >= full_end ? 1 : 0;
  for (int j = 0; j < IO::kParts; ++j) {
    pb.tail_lanes[j] = AVec::loadu(lanes + j * AVec::size()) != AVec(acc_t(0));
  }

  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / a.cols);
  const int64_t chunks = (a.rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunk_grain =
      std::max<int64_t>(1, kMinElementsPerThread / (rows_per_chunk * a.cols));
  ChunkSums sums{};
  if (chunks == 1) {
    sums = run_rows<scalar_t, kHasPrev, kHasRaw>(pb, 0, a.rows);
  } else {
    std::vector<ChunkSums> partial(chunks);
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t r0 = ch * rows_per_chunk;
        partial[ch] = run_rows<scalar_t, kHasPrev, kHasRaw>(pb, r0, std::min(a.rows, r0 + rows_per_chunk));
      }
    });
    for (const ChunkSums& p : partial) {  // fixed order: independent of the thread count
      for (int i = 0; i < kNumTerms; ++i) sums[i] += p[i];
    }
  }
  for (int i = 0; i < kNumTerms; ++i) a.sums[i] = sums[i];
}

template <typename scalar_t>
void forward_with_inputs(ForwardArgs& a) {
  if (a.prev && a.raw) forward_typed<scalar_t, true, true>(a);
  else if (a.prev) forward_typed<scalar_t, true, false>(a);
  else if (a.raw) forward_typed<scalar_t, false, true>(a);
  else forward_typed<scalar_t, false, false>(a);
}

// Backward: out = saved * grad_output, saved in grad_storage_t<scalar_t>,
// out in scalar_t (rounded once, from the accumulation type).
template <typename scalar_t>
void scale_typed(const ScaleArgs& a) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  using Pack = typename IO::Pack;
  using grad_t = grad_storage_t<scalar_t>;
  constexpr int64_t kStep = IO::kStep;

  const AVec go(*static_cast<const acc_t*>(a.grad_output));
  for (int i = 0; i < 3; ++i) {
    if (!a.saved[i]) continue;
    const auto* src = static_cast<const grad_t*>(a.saved[i]);
    auto* dst = static_cast<scalar_t*>(a.out[i]);
    at::parallel_for(0, a.numel[i], kMinElementsPerThread, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; j += kStep) {
        const int64_t n = std::min(kStep, end - j);
        Pack v = IO::load(src + j, n);
        for (auto& part : v) part = part * go;
        IO::store(dst + j, v, n);
      }
    });
  }
}

#define KF_DISPATCH_DTYPE(DTYPE, FN, ARG)                                          \
  switch (DTYPE) {                                                                 \
    case c10::ScalarType::Float: FN<float>(ARG); break;                            \
    case c10::ScalarType::Double: FN<double>(ARG); break;                          \
    case c10::ScalarType::Half: FN<c10::Half>(ARG); break;                         \
    case c10::ScalarType::BFloat16: FN<c10::BFloat16>(ARG); break;                 \
    default: TORCH_CHECK_TYPE(false, "koemorph_fused: unsupported dtype ", DTYPE); \
  }

void forward_kernel(ForwardArgs& args) { KF_DISPATCH_DTYPE(args.dtype, forward_with_inputs, args) }
void scale_kernel(const ScaleArgs& args) { KF_DISPATCH_DTYPE(args.dtype, scale_typed, args) }

#undef KF_DISPATCH_DTYPE

}  // namespace cpu::CPU_CAPABILITY
}  // namespace koemorph_fused
