// The CPU kernels of the fused loss, compiled once per instruction set.
//
// Include this from a translation unit that first defines CPU_CAPABILITY
// (DEFAULT or AVX2, plus CPU_CAPABILITY_AVX2 for the latter): ATen's
// Vectorized<> then has that width, and everything here lands in the
// namespace koemorph_fused::cpu::CPU_CAPABILITY, so the builds cannot clash.
//
// Forward is ONE pass over the elements: each is loaded once, the five sums
// are accumulated and every requested gradient is written. Contiguous inputs
// take the flat path, which reads the (R, C) block as one array whose column
// pattern repeats every lcm(C, vector width) elements (no per-row work, no
// overlapping last step); strided inputs take the row path. Work is cut into
// chunks of a fixed number of rows or periods whose partial sums are added in
// chunk order, so the result is bitwise the same whatever the thread count.
// Calls that move more than kStreamingStoreBytes write the flat path's
// gradients with non-temporal stores (cpu_vector_lanes.h, store_streaming).
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_loss_kernel.h"
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_loss_kernel_args.h"
#include "cpu_vector_lanes.h"
#include "loss_math.h"

namespace koemorph_fused {
namespace cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
struct Problem {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;
  using grad_t = grad_storage_t<scalar_t>;

  const scalar_t *pred, *target, *prev, *raw;
  int64_t pred_stride, target_stride, prev_stride, raw_stride;  // row strides (row path)
  const acc_t* mask;            // nullptr: every m_r is 1
  const acc_t* column_weights;  // colw[c], read once per chunk
  // Per column (row path) or per position in the period (flat path),
  // computed once per call: kd = difference_coefficient, and kd_keep
  // all-ones where kd != 0 (Lanes::keep_nonzero as a precomputed mask).
  const acc_t *kd, *kd_keep;
  // Gradients, contiguous (rows, cols). On the row path, one that was not
  // requested points at a one-row scratch buffer (row stride 0), so that the
  // inner loop stores without testing; grad_target is rarely wanted and is
  // tested (nullptr: not requested).
  grad_t *grad_pred, *grad_target, *grad_raw;
  int64_t grad_pred_stride, grad_raw_stride;
  int64_t rows, cols;
  AVec k_l1, k_smoothing;  // GradCoefficients, broadcast
  AVec k_temporal;         // 2*w_t / (C*denom); the gradient is this * m_r * e
  // Row path: when C is not a multiple of the step, a row's last step
  // re-reads its final kStep elements; tail_lanes selects the lanes the
  // previous steps had not covered, so that no element is summed twice.
  Pack tail_lanes;
  // Flat path: the column pattern repeats every `period` = lcm(C, kStep)
  // elements. Step s of a period starts in row first_row[s] of the period;
  // second_row marks the lanes that belong to the next row (C >= kStep, so
  // a step spans at most two rows).
  int64_t period;
  const int64_t* first_row;
  const acc_t* second_row;
  // The column weight colw[c] of each slot of the d^2 sums (see ChunkAcc);
  // 0 for a lane that holds no element (its sum stays 0).
  const acc_t* slot_weight;
  int64_t slots;  // a multiple of kStep
  // Flat path: the gradients are large enough for store_streaming.
  bool stream;
};

// What one call computes, fixed at compile time so that the inner loop has
// no tests: which inputs are present, whether a continuity mask weighs the
// temporal term, whether gradients are written, and whether the temporal
// term sends one (prev given and w_temporal > 0).
template <bool Prev, bool Raw, bool Mask, bool Grads, bool TemporalGrad>
struct Variant {
  static constexpr bool kHasPrev = Prev;
  static constexpr bool kHasRaw = Raw;
  static constexpr bool kMask = Mask;
  static constexpr bool kGrads = Grads;
  static constexpr bool kTemporalGrad = TemporalGrad;
  static_assert(!Mask || Prev, "only the temporal term reads the mask");
  static_assert(!TemporalGrad || (Prev && Grads), "a temporal gradient needs prev and gradients");
};

// Running sums of one chunk. d^2 is summed per position (slot), over the
// rows or periods: mse (the sum over all columns) and perceptual (weighted
// by colw[c]) both follow from these sums at the end of the chunk, so the
// inner loop never multiplies by the column weights. On the row path each
// step of a row has its own slot of kStep lanes, the overlapping last step
// too, so that no slot is read right after a store to a partly overlapping address.
template <class AVec>
struct ChunkAcc {
  AVec abs, temporal, smoothing;  // sum |d|, sum m_r e^2, sum |s|
};

// Where one step reads and writes: element `i` of the row bases below, and
// position `o` of the per-column (or per-period) arrays.
template <typename scalar_t>
struct StepBase {
  using acc_t = at::opmath_type<scalar_t>;
  using grad_t = grad_storage_t<scalar_t>;
  const scalar_t *pred, *target, *prev, *raw;
  grad_t *grad_pred, *grad_raw, *grad_target;  // grad_target nullptr: not requested
  const acc_t *kd, *kd_keep;
  acc_t* sq;
};

// One step: kStep elements (fewer, `count`, at the end of a row narrower
// than a step or of the last period). m: m_r of each lane (with V::kMask).
template <typename scalar_t, class V, bool kOverlap>
KF_HD void step(const Problem<scalar_t>& pb, const StepBase<scalar_t>& at, int64_t i, int64_t o,
                int64_t count, const typename Io<scalar_t>::Pack& m,
                ChunkAcc<typename Io<scalar_t>::AVec>& acc) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;

  const Pack p = IO::load(at.pred + i, count);
  const Pack t = IO::load(at.target + i, count);
  Pack pv{}, rw{}, kd{}, kd_keep{};
  if constexpr (V::kHasPrev) pv = IO::load(at.prev + i, count);
  if constexpr (V::kHasRaw) rw = IO::load(at.raw + i, count);
  if constexpr (V::kGrads) {
    kd = IO::load(at.kd + o, count);
    kd_keep = IO::load(at.kd_keep + o, count);
  }
  Pack sq = IO::load(at.sq + o, count);

  Pack g_pred, g_target, g_raw;
  for (int j = 0; j < IO::kParts; ++j) {
    AVec d = p[j] - t[j];
    AVec e, me, s;  // me = m_r * e
    if constexpr (V::kHasPrev) {
      e = p[j] - pv[j];
      if constexpr (V::kMask) me = m[j] * e;
      else me = e;
    }
    if constexpr (V::kHasRaw) s = p[j] - rw[j];
    if constexpr (V::kGrads) {
      // difference_gradient(d, kd, k_l1) of loss_math.h, its keep_nonzero mask precomputed.
      const AVec gd = (kd_keep[j] & (kd[j] * d)) + Lanes<AVec>::scaled_sign(d, pb.k_l1);
      AVec g = gd;
      g_target[j] = gd;  // negated when stored
      if constexpr (V::kTemporalGrad) g = g + temporal_gradient(me, pb.k_temporal);
      if constexpr (V::kHasRaw) {
        const AVec gs = smoothing_gradient(s, pb.k_smoothing);
        g = g + gs;
        g_raw[j] = gs.neg();
      }
      g_pred[j] = g;
    }
    if constexpr (kOverlap) {  // lanes already counted become +0
      d = pb.tail_lanes[j] & d;
      if constexpr (V::kHasPrev) {
        e = pb.tail_lanes[j] & e;
        me = pb.tail_lanes[j] & me;
      }
      if constexpr (V::kHasRaw) s = pb.tail_lanes[j] & s;
    }
    sq[j] = at::vec::fmadd(d, d, sq[j]);
    acc.abs = acc.abs + Lanes<AVec>::abs(d);
    if constexpr (V::kHasPrev) acc.temporal = at::vec::fmadd(me, e, acc.temporal);
    if constexpr (V::kHasRaw) acc.smoothing = acc.smoothing + Lanes<AVec>::abs(s);
  }
  IO::store(at.sq + o, sq, count);

  if constexpr (V::kGrads) {
    IO::store_gradient(at.grad_pred + i, g_pred, count, pb.stream);
    if constexpr (V::kHasRaw) IO::store_gradient(at.grad_raw + i, g_raw, count, pb.stream);
    if (at.grad_target) {
      for (auto& v : g_target) v = v.neg();
      IO::store_gradient(at.grad_target + i, g_target, count, pb.stream);
    }
  }
}

using ChunkSums = std::array<double, kNumTerms>;

// The five sums of a chunk, from its running sums. `acc` is taken by value:
// were the loop's accumulators passed by address, that address would escape,
// and GCC would keep them in memory (any float store might alias them).
template <typename scalar_t>
KF_HD ChunkSums chunk_sums(const Problem<scalar_t>& pb, const typename Io<scalar_t>::acc_t* sq,
                           ChunkAcc<typename Io<scalar_t>::AVec> acc) {
  using AVec = typename Io<scalar_t>::AVec;
  using acc_t = typename Io<scalar_t>::acc_t;
  AVec sq_sum(acc_t(0)), perceptual(acc_t(0));
  for (int64_t k = 0; k < pb.slots; k += AVec::size()) {
    const AVec v = AVec::loadu(sq + k), w = AVec::loadu(pb.slot_weight + k);
    sq_sum = sq_sum + v;
    perceptual = perceptual + Lanes<AVec>::keep_nonzero(w, w * v);  // colw = 0: not in the term
  }
  ChunkSums out;
  out[kMse] = horizontal_sum(sq_sum);
  out[kL1] = horizontal_sum(acc.abs);
  out[kPerceptual] = horizontal_sum(perceptual);
  out[kTemporal] = horizontal_sum(acc.temporal);
  out[kSmoothing] = horizontal_sum(acc.smoothing);
  return out;
}

// Row path, rows [r0, r1): any row strides, any C.
template <typename scalar_t, class V>
ChunkSums run_rows(const Problem<scalar_t>& shared, int64_t r0, int64_t r1) {
  // A private copy: the gradient stores below could alias the shared struct
  // (vector types may alias any float), which made the compiler reload every
  // pointer, stride and coefficient from memory at each step.
  const Problem<scalar_t> pb = shared;
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  using Pack = typename IO::Pack;
  constexpr int64_t kStep = IO::kStep;

  const int64_t cols = pb.cols;
  const int64_t full_end = cols - cols % kStep;
  const bool overlap_tail = full_end != cols && cols >= kStep;
  ScratchBuffer<acc_t, kMaxFlatPeriod> sq(pb.slots);

  const AVec zero(acc_t(0));
  ChunkAcc<AVec> acc{zero, zero, zero};
  Pack m{};
  for (int64_t r = r0; r < r1; ++r) {
    if constexpr (V::kMask) m.fill(AVec(pb.mask[r]));
    const StepBase<scalar_t> at{pb.pred + r * pb.pred_stride,
                                pb.target + r * pb.target_stride,
                                pb.prev + r * pb.prev_stride,
                                pb.raw + r * pb.raw_stride,
                                pb.grad_pred + r * pb.grad_pred_stride,
                                pb.grad_raw + r * pb.grad_raw_stride,
                                pb.grad_target ? pb.grad_target + r * cols : nullptr,
                                pb.kd,
                                pb.kd_keep,
                                sq.data()};
    int64_t c = 0;
    for (; c < full_end; c += kStep) step<scalar_t, V, false>(pb, at, c, c, kStep, m, acc);
    if (c < cols) {
      if (overlap_tail) {  // columns cols-kStep.., summed into slot c
        StepBase<scalar_t> tail = at;
        tail.sq += c - (cols - kStep);
        step<scalar_t, V, true>(pb, tail, cols - kStep, cols - kStep, kStep, m, acc);
      } else {
        step<scalar_t, V, false>(pb, at, c, c, cols - c, m, acc);
      }
    }
  }
  return chunk_sums(pb, sq.data(), acc);
}

// Flat path, elements [e0, e1) of contiguous rows, e0 a multiple of the
// period: no per-row work and no overlapping step; the column pattern is
// read from the per-period arrays.
template <typename scalar_t, class V>
ChunkSums run_flat(const Problem<scalar_t>& shared, int64_t e0, int64_t e1) {
  const Problem<scalar_t> pb = shared;  // private copy, as in run_rows
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  using Pack = typename IO::Pack;
  constexpr int64_t kStep = IO::kStep;

  const int64_t period = pb.period;
  ScratchBuffer<acc_t, kMaxFlatPeriod> sq(pb.slots);
  const StepBase<scalar_t> at{pb.pred, pb.target, pb.prev, pb.raw, pb.grad_pred, pb.grad_raw,
                              pb.grad_target, pb.kd, pb.kd_keep, sq.data()};
  const AVec zero(acc_t(0));
  ChunkAcc<AVec> acc{zero, zero, zero};
  Pack m{};
  // m_r of each lane of step o of the period that starts in row row0.
  const auto lane_mask = [&](int64_t row0, int64_t o) {
    if constexpr (V::kMask) {
      const int64_t r = row0 + pb.first_row[o / kStep];
      const AVec m0(pb.mask[r]), m1(pb.mask[std::min(r + 1, pb.rows - 1)]);
      for (int j = 0; j < IO::kParts; ++j) {
        m[j] = AVec::blendv(m0, m1, AVec::loadu(pb.second_row + o + j * AVec::size()));
      }
    }
  };
  const int64_t rows_per_period = period / pb.cols;
  const int64_t full_end = e0 + (e1 - e0) / period * period;
  int64_t row0 = e0 / pb.cols;
  for (int64_t start = e0; start < full_end; start += period, row0 += rows_per_period) {
    for (int64_t o = 0; o < period; o += kStep) {
      lane_mask(row0, o);
      step<scalar_t, V, false>(pb, at, start + o, o, kStep, m, acc);
    }
  }
  if (full_end < e1) {  // the last, partial period of the last chunk
    const int64_t n = e1 - full_end;
    for (int64_t o = 0; o < n; o += kStep) {
      lane_mask(row0, o);
      step<scalar_t, V, false>(pb, at, full_end + o, o, std::min(kStep, n - o), m, acc);
    }
  }
  if (pb.stream) store_fence();
  return chunk_sums(pb, sq.data(), acc);
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

template <typename scalar_t, class V>
void forward_typed(ForwardArgs& a) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  using grad_t = grad_storage_t<scalar_t>;
  constexpr int64_t kStep = IO::kStep;
  const int64_t rows = a.rows, cols = a.cols;

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
  pb.rows = rows;
  pb.cols = cols;

  // The flat path needs rows laid out one after another, a step that spans
  // at most two rows, and every gradient it writes allocated.
  const auto packed = [&](const void* x, int64_t stride) { return !x || rows == 1 || stride == cols; };
  const int64_t period = std::lcm(cols, kStep);
  const bool flat = packed(a.pred, a.pred_stride) && packed(a.target, a.target_stride) &&
                    packed(a.prev, a.prev_stride) && packed(a.raw, a.raw_stride) &&
                    cols >= kStep && period <= kMaxFlatPeriod &&
                    (!V::kGrads || (a.grad_pred && (!V::kHasRaw || a.grad_raw)));

  const GradCoefficients<acc_t> k = make_coefficients<acc_t>(a.weights, rows, cols);
  pb.k_l1 = AVec(k.l1);
  pb.k_smoothing = AVec(k.smoothing);
  a.mask_sum = (V::kHasPrev && pb.mask) ? sum_mask(pb.mask, rows) : static_cast<double>(rows);
  pb.k_temporal = AVec(static_cast<acc_t>(static_cast<double>(k.temporal) / temporal_denominator(a.mask_sum)));

  // kd and kd_keep, per column or per position in the period.
  const int64_t positions = flat ? period : cols;
  ScratchBuffer<acc_t, 512> kd(V::kGrads ? 2 * positions : 0);
  if constexpr (V::kGrads) {
    for (int64_t i = 0, c = 0; i < positions; ++i, c = c + 1 == cols ? 0 : c + 1) {
      kd[i] = difference_coefficient(pb.column_weights[c], k.mse, k.perceptual);
      const Bits<acc_t> keep = kd[i] != acc_t(0) ? ~Bits<acc_t>(0) : Bits<acc_t>(0);
      std::memcpy(&kd[positions + i], &keep, sizeof(acc_t));
    }
  }
  pb.kd = kd.data();
  pb.kd_keep = kd.data() + positions;

  // Outputs that were not requested go to a scratch row (row path only).
  const bool need_scratch = V::kGrads && !flat && (!a.grad_pred || (V::kHasRaw && !a.grad_raw));
  ScratchBuffer<grad_t, 128> scratch(need_scratch ? cols : 0);
  pb.grad_pred = a.grad_pred ? static_cast<grad_t*>(a.grad_pred) : scratch.data();
  pb.grad_pred_stride = a.grad_pred ? cols : 0;
  pb.grad_raw = a.grad_raw ? static_cast<grad_t*>(a.grad_raw) : scratch.data();
  pb.grad_raw_stride = a.grad_raw ? cols : 0;
  pb.grad_target = static_cast<grad_t*>(a.grad_target);
  // Large calls stream their gradients (kStreamingStoreBytes). Flat steps start
  // at multiples of kStep elements, so they are aligned where the buffers are.
  pb.stream = V::kGrads && flat &&
              streams_gradients<scalar_t>(rows * cols, 2 + V::kHasPrev + V::kHasRaw,
                                          !!a.grad_pred + !!a.grad_raw + !!a.grad_target) &&
              streamable(a.grad_pred) && streamable(a.grad_raw) && streamable(a.grad_target);

  alignas(64) acc_t lanes[kStep];
  const int64_t full_end = cols - cols % kStep;
  for (int64_t i = 0; i < kStep; ++i) lanes[i] = (cols - kStep + i) >= full_end ? 1 : 0;
  for (int j = 0; j < IO::kParts; ++j) {
    pb.tail_lanes[j] = AVec::loadu(lanes + j * AVec::size()) != AVec(acc_t(0));
  }

  pb.period = period;
  const bool flat_mask = flat && V::kMask;
  ScratchBuffer<int64_t, 64> first_row(flat_mask ? period / kStep : 0);
  ScratchBuffer<acc_t, 512> second_row(flat_mask ? period : 0);
  if (flat_mask) {
    for (int64_t o = 0; o < period; ++o) {
      const int64_t first = (o / kStep) * kStep / cols;
      first_row[o / kStep] = first;
      const Bits<acc_t> next = o / cols > first ? ~Bits<acc_t>(0) : Bits<acc_t>(0);
      std::memcpy(&second_row[o], &next, sizeof(acc_t));
    }
  }
  pb.first_row = first_row.data();
  pb.second_row = second_row.data();

  // Slots of the d^2 sums: one per position of the period (flat path), or
  // kStep per step of a row (row path; the overlapping last step's lanes are
  // columns cols-kStep+lane).
  const int64_t row_slots = (cols + kStep - 1) / kStep * kStep;
  pb.slots = flat ? period : row_slots;
  ScratchBuffer<acc_t, kMaxFlatPeriod> slot_weight(pb.slots);
  for (int64_t i = 0, c = 0; i < pb.slots; ++i, c = c + 1 == cols ? 0 : c + 1) {
    if (flat) {
      slot_weight[i] = pb.column_weights[c];
    } else {
      const bool tail = cols % kStep != 0 && cols >= kStep && i >= row_slots - kStep;
      const int64_t col = tail ? cols - kStep + (i - (row_slots - kStep)) : i;
      slot_weight[i] = col < cols ? pb.column_weights[col] : acc_t(0);
    }
  }
  pb.slot_weight = slot_weight.data();

  // Chunks: whole rows (row path) or whole periods (flat path) of about
  // kChunkElements elements, a fixed partition whatever the thread count.
  const int64_t unit = flat ? period : cols;  // elements per row or per period
  const int64_t units = flat ? (rows * cols + period - 1) / period : rows;
  const int64_t units_per_chunk = std::max<int64_t>(1, kChunkElements / unit);
  const int64_t chunks = (units + units_per_chunk - 1) / units_per_chunk;
  const int64_t chunk_grain = std::max<int64_t>(1, kMinElementsPerThread / (units_per_chunk * unit));
  const auto run_chunk = [&](int64_t ch) {
    const int64_t u0 = ch * units_per_chunk, u1 = std::min(units, u0 + units_per_chunk);
    return flat ? run_flat<scalar_t, V>(pb, u0 * period, std::min(rows * cols, u1 * period))
                : run_rows<scalar_t, V>(pb, u0, u1);
  };
  ChunkSums sums{};
  if (chunks == 1) {
    sums = run_chunk(0);
  } else {
    std::vector<ChunkSums> partial(chunks);
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) partial[ch] = run_chunk(ch);
    });
    for (const ChunkSums& p : partial) {  // fixed order: independent of the thread count
      for (int i = 0; i < kNumTerms; ++i) sums[i] += p[i];
    }
  }
  for (int i = 0; i < kNumTerms; ++i) a.sums[i] = sums[i];
}

template <typename scalar_t, bool kPrev, bool kMask, bool kGrads, bool kTemporalGrad>
void forward_with_raw(ForwardArgs& a) {
  if (a.raw) forward_typed<scalar_t, Variant<kPrev, true, kMask, kGrads, kTemporalGrad>>(a);
  else forward_typed<scalar_t, Variant<kPrev, false, kMask, kGrads, kTemporalGrad>>(a);
}

template <typename scalar_t, bool kGrads, bool kTemporalGrad>
void forward_with_prev(ForwardArgs& a) {
  if (!a.prev) {
    if constexpr (!kTemporalGrad) forward_with_raw<scalar_t, false, false, kGrads, false>(a);
  } else if (a.mask) {
    forward_with_raw<scalar_t, true, true, kGrads, kTemporalGrad>(a);
  } else {
    forward_with_raw<scalar_t, true, false, kGrads, kTemporalGrad>(a);
  }
}

template <typename scalar_t>
void forward_with_inputs(ForwardArgs& a) {
  if (!(a.grad_pred || a.grad_target || a.grad_raw)) forward_with_prev<scalar_t, false, false>(a);
  else if (a.prev && a.weights[kTemporal] > 0.0) forward_with_prev<scalar_t, true, true>(a);
  else forward_with_prev<scalar_t, true, false>(a);
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

}  // namespace cpu::CPU_CAPABILITY
}  // namespace koemorph_fused

// The entry points of one dtype (declared in cpu_loss_kernel_args.h). Each
// cpu_loss_kernel_<isa>_<dtype>.cpp expands this once, at file scope, so a
// translation unit instantiates the kernels of one dtype only.
#define KF_DEFINE_CPU_KERNELS(T, NAME)                                     \
  namespace koemorph_fused::cpu::CPU_CAPABILITY {                          \
  void forward_##NAME(ForwardArgs& args) { forward_with_inputs<T>(args); } \
  void scale_##NAME(const ScaleArgs& args) { scale_typed<T>(args); }       \
  }
