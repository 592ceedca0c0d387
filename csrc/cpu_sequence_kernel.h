// The CPU kernel of the sequence loss (windows of frames (B, T, C)),
// compiled once per instruction set like cpu_loss_kernel.h: include it from a
// translation unit that first defines CPU_CAPABILITY.
//
// One design with the row kernel: the lane pieces of loss_math.h, the
// Io<> loads and stores of cpu_vector_lanes.h, chunks of a fixed size whose
// partial sums are added in chunk order (bitwise the same for any thread
// count), gradients stored as grad_storage_t.
//
// The previous frame pred[b, t-1] (and target[b, t-1]) is read in place, one
// frame stride back (still in L1); at t = 0 it is prev[b] / prev_target[b].
// The velocity term of frame t+1 moves the gradients of frames t+1 and t:
// frame t's step recomputes that share from frames t+1 and t (two more loads
// from L1), so each gradient element is computed in one place, stored once,
// and no state crosses frames or chunks.
//
// Two loops over a chunk's frames. Contiguous frames (column stride 1, frame
// stride C) whose every frame is in V, P and P_v take the flat loop: the run
// of frames is one array whose column pattern repeats every lcm(C, kStep)
// elements, as the row kernel's flat path, with no per-frame work and no
// overlapping last step. Every other frame (the first of a window, padding,
// a pair boundary, strided inputs, frame_scale, reduction "none") takes the
// frame loop: one frame of C columns in steps, the last one overlapping.
//
// Calls that move more than kStreamingStoreBytes write the flat runs'
// gradients and the padded frames' zeros with non-temporal stores
// (cpu_vector_lanes.h, store_streaming); every chunk ends with a fence.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_sequence_kernel.h"
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_sequence_kernel_args.h"
#include "cpu_vector_lanes.h"
#include "loss_math.h"

namespace koemorph_fused::cpu::CPU_CAPABILITY {

using SequenceSums = std::array<double, kNumSequenceTerms>;

// A frame in V, P and P_v: what every frame of a flat run is.
constexpr uint8_t kFrameFull = kFrameValid | kFramePair | kFrameVelocityPair;

template <typename scalar_t>
struct SequenceProblem {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;
  using grad_t = grad_storage_t<scalar_t>;

  const scalar_t *pred, *target, *raw, *prev, *prev_target;
  int64_t ps[3], ts[3], rs[3], prev_s[2], prev_target_s[2];  // element strides
  const uint8_t* flags;
  const acc_t* frame_scale;  // nullptr: 1
  // Per column, once per call: the coefficient of d in the gradient
  // (difference_coefficient over the denominators) and its keep_nonzero mask;
  // the column weights and their mask (for the perceptual sum).
  const acc_t *kd, *kd_keep, *colw, *colw_keep;
  // The same four per position of the period lcm(C, kStep), period + kStep
  // long (a flat step may start anywhere in the period); period 0: no flat
  // loop for this call.
  const acc_t *flat_kd, *flat_kd_keep, *flat_colw, *flat_colw_keep;
  int64_t period;
  grad_t *grad_pred, *grad_target, *grad_raw;
  acc_t *frame_terms, *frame_total;
  int64_t batch, frames, cols;
  int64_t slots;  // the per-column tables' length: C rounded up to whole steps
  double weights[kNumSequenceTerms];
  // Gradient coefficients before the frame's scale: w_l1/(C den), w_s/(C den),
  // 2 w_t/(C den), 2 w_v/(C den).
  acc_t k_l1, k_smoothing, k_temporal, k_velocity;
  // When C is not a multiple of the step, a frame's last step re-reads its
  // final kStep columns; tail_lanes selects the lanes the earlier steps had
  // not covered, so that nothing is summed twice.
  Pack tail_lanes;
  // The gradients are large enough for store_streaming, and aligned for it (flat runs).
  bool stream;
};

// The coefficients of one frame: the call's, times the frame's scale, and
// the velocity coefficient of the next frame (its share in this frame's
// gradients).
template <typename scalar_t>
struct FrameCoefficients {
  using AVec = typename Io<scalar_t>::AVec;
  using acc_t = typename Io<scalar_t>::acc_t;
  acc_t scale;
  AVec kd_scale, temporal, velocity, velocity_next;
  // scaled_sign needs a coefficient >= 0: l1 and smoothing hold |scale| times
  // theirs, and `flip` (the sign bit of a negative scale) is XORed in after.
  AVec l1, smoothing, flip;
  bool temporal_on, velocity_on;  // the coefficient is not 0 (0 * NaN must not leak)
};

template <typename scalar_t>
KF_HD typename Io<scalar_t>::acc_t frame_scale_of(const SequenceProblem<scalar_t>& pb, int64_t f) {
  return pb.frame_scale ? pb.frame_scale[f] : typename Io<scalar_t>::acc_t(1);
}

template <typename scalar_t>
KF_HD FrameCoefficients<scalar_t> frame_coefficients(const SequenceProblem<scalar_t>& pb, int64_t f) {
  using acc_t = typename Io<scalar_t>::acc_t;
  using AVec = typename Io<scalar_t>::AVec;
  FrameCoefficients<scalar_t> k;
  k.scale = frame_scale_of(pb, f);
  const acc_t t = pb.k_temporal * k.scale, v = pb.k_velocity * k.scale;
  const acc_t magnitude = k.scale < acc_t(0) ? -k.scale : k.scale;
  k.kd_scale = AVec(k.scale);
  k.l1 = AVec(pb.k_l1 * magnitude);
  k.smoothing = AVec(pb.k_smoothing * magnitude);
  k.flip = AVec(k.scale < acc_t(0) ? acc_t(-0.0) : acc_t(0));
  k.temporal = AVec(t);
  k.velocity = AVec(v);
  k.velocity_next = AVec(acc_t(0));
  k.temporal_on = t != acc_t(0);
  k.velocity_on = v != acc_t(0);
  return k;
}

// Running sums (of a frame, then folded into the chunk's times the frame's
// scale, or written out for reduction "none"; or of a whole flat run).
template <class AVec>
struct FrameSums {
  AVec sq, abs, perceptual, temporal, smoothing, velocity;
};

// What a loop's steps add to, in two locals of three vectors: the sums of
// d = pred - target, and the others. GCC keeps an aggregate in registers
// only up to its scalarization size limit; one of six AVX2 vectors (192
// bytes) stayed in memory, a store-to-load chain of about ten cycles per step.
template <class AVec>
struct DiffSums {
  AVec sq, abs, perceptual;
};
template <class AVec>
struct OtherSums {
  AVec temporal, smoothing, velocity;
};

// The six terms' sums from running sums over C columns: every term is a mean
// over the columns except perceptual, whose column weights hold the 1/|group|.
template <class AVec>
SequenceSums term_sums(const FrameSums<AVec> acc, int64_t cols) {
  const double inv_c = 1.0 / static_cast<double>(cols);
  SequenceSums out;
  out[kMse] = horizontal_sum(acc.sq) * inv_c;
  out[kL1] = horizontal_sum(acc.abs) * inv_c;
  out[kPerceptual] = horizontal_sum(acc.perceptual);
  out[kTemporal] = horizontal_sum(acc.temporal) * inv_c;
  out[kSmoothing] = horizontal_sum(acc.smoothing) * inv_c;
  out[kVelocity] = horizontal_sum(acc.velocity) * inv_c;
  return out;
}

// The operands of one step, as vectors of the accumulation type: this
// frame's pred, target, raw; the previous frame's pred and target (q, s);
// the next frame's (pn, gn); the per-column tables.
template <class Pack>
struct StepOperands {
  Pack p, g, r, q, s, pn, gn, kd, kd_keep, cw, cw_keep;
};

// The arithmetic of one step, shared by the frame loop and the flat loop so
// that both compute a gradient with the same expressions. kPair: 0 (no
// pair), 1 (in P), 2 (in P and P_v); kNext: the next frame is in P_v and
// sends its velocity share; kScaled: a frame scale other than 1 (kd_scale,
// flip); kOverlap: the lanes tail_lanes clears were summed by an earlier step;
// kSlots: d^2 goes to the step's slots `sq` (one per position of the flat
// period, weighed by the column weights once per chunk) instead of the sq and
// perceptual sums.
template <typename scalar_t, bool kRaw, bool kGrads, int kPair, bool kNext, bool kScaled, bool kOverlap,
          bool kSlots = false>
KF_HD void step_lanes(const StepOperands<typename Io<scalar_t>::Pack>& in, const FrameCoefficients<scalar_t>& k,
                      const typename Io<scalar_t>::Pack& tail, DiffSums<typename Io<scalar_t>::AVec>& ds,
                      OtherSums<typename Io<scalar_t>::AVec>& os,
                      typename Io<scalar_t>::Pack& g_pred, typename Io<scalar_t>::Pack& g_target,
                      typename Io<scalar_t>::Pack& g_raw, typename Io<scalar_t>::Pack* sq = nullptr) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  static_assert(!kNext || kGrads, "the next frame's share only moves gradients");
  for (int j = 0; j < IO::kParts; ++j) {
    const AVec p = in.p[j], g = in.g[j];
    AVec d = p - g;
    AVec e, u, un, rp;
    if constexpr (kPair >= 1) e = p - in.q[j];        // pred[t] - pred[t-1]
    // Velocity residual as d[t] - d[t-1] (docs/design.md, "Velocity coupling":
    // the spec's grouping keeps p and g live longer and cost 5-8 % here), and
    // minus the next frame's, d[t] - d[t+1]: exactly -(that frame's u), up to
    // the sign of zero.
    if constexpr (kPair == 2) u = d - (in.q[j] - in.s[j]);
    if constexpr (kNext) un = d - (in.pn[j] - in.gn[j]);
    if constexpr (kRaw) rp = in.r[j] - p;  // raw - pred: its sign is raw's gradient's
    if constexpr (kGrads) {
      // difference_gradient of loss_math.h with its keep_nonzero mask
      // precomputed and applied to d (kd = 0: d becomes +0), in one fmadd;
      // and to the scaled coefficient (kd = 0 with an infinite scale: 0, not NaN).
      AVec kdd = in.kd[j];
      if constexpr (kScaled) kdd = in.kd_keep[j] & (kdd * k.kd_scale);
      AVec l1 = Lanes<AVec>::scaled_sign(d, k.l1);
      if constexpr (kScaled) l1 = l1 ^ k.flip;
      const AVec gd = at::vec::fmadd(kdd, in.kd_keep[j] & d, l1);
      AVec gp = gd, gt = gd.neg();
      if constexpr (kPair >= 1) {
        if (k.temporal_on) gp = at::vec::fmadd(k.temporal, e, gp);  // pred[t-1] detached
      }
      if constexpr (kRaw) {  // smoothing_gradient, negated: raw's gradient
        AVec gr = smoothing_gradient(rp, k.smoothing);
        if constexpr (kScaled) gr = gr ^ k.flip;
        gp = gp - gr;
        g_raw[j] = gr;
      }
      if constexpr (kPair == 2) {
        if (k.velocity_on) {  // same form as the temporal gradient: coefficient * residual
          gp = at::vec::fmadd(k.velocity, u, gp);
          gt = at::vec::fmadd(k.velocity.neg(), u, gt);
        }
      }
      if constexpr (kNext) {
        gp = at::vec::fmadd(k.velocity_next, un, gp);
        gt = at::vec::fmadd(k.velocity_next.neg(), un, gt);
      }
      g_pred[j] = gp;
      g_target[j] = gt;
    }
    if constexpr (kOverlap) {  // lanes already counted become +0
      d = tail[j] & d;
      if constexpr (kPair >= 1) e = tail[j] & e;
      if constexpr (kPair == 2) u = tail[j] & u;
      if constexpr (kRaw) rp = tail[j] & rp;
    }
    if constexpr (kSlots) {
      (*sq)[j] = at::vec::fmadd(d, d, (*sq)[j]);
    } else {
      const AVec d2 = d * d;
      ds.sq = ds.sq + d2;
      ds.perceptual = ds.perceptual + (in.cw_keep[j] & (in.cw[j] * d2));  // colw = 0: not in the term
    }
    ds.abs = ds.abs + Lanes<AVec>::abs(d);
    if constexpr (kPair >= 1) os.temporal = at::vec::fmadd(e, e, os.temporal);
    if constexpr (kPair == 2) os.velocity = at::vec::fmadd(u, u, os.velocity);
    if constexpr (kRaw) os.smoothing = os.smoothing + Lanes<AVec>::abs(rp);
  }
}

// ---------------------------------------------------------------- frame loop

// Where one frame's steps read and write.
template <typename scalar_t>
struct FrameView {
  using grad_t = grad_storage_t<scalar_t>;
  const scalar_t *pred, *target, *raw;
  const scalar_t *q, *s;    // the previous frame's pred and target (or prev, prev_target)
  const scalar_t *pn, *gn;  // the next frame's pred and target (kNext)
  int64_t pred_c, target_c, raw_c, q_c, s_c;  // column strides
  grad_t *gp, *gt, *gr;  // this frame's gradient rows; nullptr: not requested
};

// kStep elements of a frame at column c (fewer, `count`, when C < kStep),
// read with any column stride: a stride of 1 is a vector load, any other a
// gather into a small buffer.
template <typename scalar_t>
KF_HD typename Io<scalar_t>::Pack load_columns(const scalar_t* row, int64_t stride, int64_t c,
                                               int64_t count) {
  using IO = Io<scalar_t>;
  if (stride == 1) return IO::load(row + c, count);
  alignas(64) scalar_t buf[IO::kStep];
  for (int64_t i = 0; i < count; ++i) buf[i] = row[(c + i) * stride];
  return IO::load(buf, count);
}

// One step of a frame at column c.
template <typename scalar_t, bool kRaw, bool kGrads, int kPair, bool kNext, bool kOverlap>
KF_HD void frame_step(const SequenceProblem<scalar_t>& pb, const FrameView<scalar_t>& fv,
                      const FrameCoefficients<scalar_t>& k, int64_t c, int64_t count,
                      DiffSums<typename Io<scalar_t>::AVec>& ds, OtherSums<typename Io<scalar_t>::AVec>& os) {
  using IO = Io<scalar_t>;
  using Pack = typename IO::Pack;
  StepOperands<Pack> in{};
  in.p = load_columns(fv.pred, fv.pred_c, c, count);
  in.g = load_columns(fv.target, fv.target_c, c, count);
  if constexpr (kRaw) in.r = load_columns(fv.raw, fv.raw_c, c, count);
  if constexpr (kPair >= 1) in.q = load_columns(fv.q, fv.q_c, c, count);
  if constexpr (kPair == 2) in.s = load_columns(fv.s, fv.s_c, c, count);
  if constexpr (kNext) {
    in.pn = load_columns(fv.pn, fv.pred_c, c, count);
    in.gn = load_columns(fv.gn, fv.target_c, c, count);
  }
  in.cw = IO::load(pb.colw + c, count);
  in.cw_keep = IO::load(pb.colw_keep + c, count);
  if constexpr (kGrads) {
    in.kd = IO::load(pb.kd + c, count);
    in.kd_keep = IO::load(pb.kd_keep + c, count);
  }
  Pack g_pred, g_target, g_raw;
  step_lanes<scalar_t, kRaw, kGrads, kPair, kNext, true, kOverlap>(in, k, pb.tail_lanes, ds, os, g_pred, g_target,
                                                                    g_raw);
  if constexpr (kGrads) {
    if (fv.gp) IO::store(fv.gp + c, g_pred, count);
    if (fv.gt) IO::store(fv.gt + c, g_target, count);
    if constexpr (kRaw) {
      if (fv.gr) IO::store(fv.gr + c, g_raw, count);
    }
  }
}

// Calls fn(c, count, overlap) for each step of a frame of C columns: full
// steps, then (C not a multiple of kStep) either one overlapping step over
// the final kStep columns, or, when C < kStep, one partial step.
template <int64_t kStep, class Fn>
KF_HD void for_each_step(int64_t cols, Fn&& fn) {
  const int64_t full_end = cols - cols % kStep;
  int64_t c = 0;
  for (; c < full_end; c += kStep) fn(c, kStep, std::false_type{});
  if (c < cols) {
    if (cols >= kStep) fn(cols - kStep, kStep, std::true_type{});
    else fn(c, cols - c, std::false_type{});
  }
}

// One frame's sums, kept in DiffSums / OtherSums locals and returned by value.
template <typename scalar_t, bool kRaw, bool kGrads, int kPair, bool kNext>
KF_HD FrameSums<typename Io<scalar_t>::AVec> run_frame(const SequenceProblem<scalar_t>& pb,
                                                       const FrameView<scalar_t>& fv,
                                                       const FrameCoefficients<scalar_t>& k) {
  using AVec = typename Io<scalar_t>::AVec;
  const AVec zero(typename AVec::value_type(0));
  DiffSums<AVec> ds{zero, zero, zero};
  OtherSums<AVec> os{zero, zero, zero};
  for_each_step<Io<scalar_t>::kStep>(pb.cols, [&](int64_t c, int64_t count, auto overlap) {
    frame_step<scalar_t, kRaw, kGrads, kPair, kNext, decltype(overlap)::value>(pb, fv, k, c, count, ds, os);
  });
  return {ds.sq, ds.abs, ds.perceptual, os.temporal, os.smoothing, os.velocity};
}

template <typename scalar_t, bool kRaw, bool kGrads, int kPair>
KF_HD FrameSums<typename Io<scalar_t>::AVec> run_frame_next(const SequenceProblem<scalar_t>& pb,
                                                            const FrameView<scalar_t>& fv,
                                                            const FrameCoefficients<scalar_t>& k, bool next) {
  if constexpr (kGrads) {
    if (next) return run_frame<scalar_t, kRaw, kGrads, kPair, true>(pb, fv, k);
  }
  return run_frame<scalar_t, kRaw, kGrads, kPair, false>(pb, fv, k);
}

// ----------------------------------------------------------------- flat loop

// Where a flat run reads and writes: its first frame's rows (column stride 1,
// frame stride C), element i of the run at offset i; the per-position tables.
template <typename scalar_t>
struct FlatView {
  using acc_t = typename Io<scalar_t>::acc_t;
  using grad_t = grad_storage_t<scalar_t>;
  const scalar_t *pred, *target, *raw;
  grad_t *gp, *gt, *gr;  // nullptr: not requested
  const acc_t *kd, *kd_keep;
  acc_t* sq;  // the chunk's sums of d^2 per position of the period (period + kStep)
  int64_t cols, period;
  // The first element of the run (from 0 to kStep - 1) whose index over all
  // B * T frames is a multiple of kStep.
  int64_t first_step;
  bool stream;  // SequenceProblem::stream
  // With stream: prefetch_streaming. Only for frames of at most
  // kPrefetchMaxFrameBytes: a prefetched line skips L2, and a row is read
  // again two frames later (as the previous frame), so three frames of pred
  // and of target must stay in L1 meanwhile.
  bool prefetch;
};

// One step of a flat run: element i, position o of the period. kTarget:
// target's gradient is stored (otherwise the compiler drops its arithmetic,
// which also frees a register for the running sums).
template <typename scalar_t, bool kRaw, bool kGrads, bool kNext, bool kTarget>
KF_HD void flat_step(const FlatView<scalar_t>& v, const FrameCoefficients<scalar_t>& k, int64_t i, int64_t o,
                     int64_t count, bool stream, DiffSums<typename Io<scalar_t>::AVec>& ds,
                     OtherSums<typename Io<scalar_t>::AVec>& os) {
  using IO = Io<scalar_t>;
  using Pack = typename IO::Pack;
  const int64_t C = v.cols;
  StepOperands<Pack> in{};
  if (v.prefetch) {  // past the next frame's row (the furthest a step reads)
    prefetch_streaming(v.pred, i + C);
    prefetch_streaming(v.target, i + C);
    if constexpr (kRaw) prefetch_streaming(v.raw, i);
  }
  in.p = IO::load(v.pred + i, count);
  in.g = IO::load(v.target + i, count);
  if constexpr (kRaw) in.r = IO::load(v.raw + i, count);
  in.q = IO::load(v.pred + i - C, count);
  in.s = IO::load(v.target + i - C, count);
  if constexpr (kNext) {
    in.pn = IO::load(v.pred + i + C, count);
    in.gn = IO::load(v.target + i + C, count);
  }
  if constexpr (kGrads) {
    in.kd = IO::load(v.kd + o, count);
    in.kd_keep = IO::load(v.kd_keep + o, count);
  }
  Pack g_pred, g_target, g_raw;
  Pack sq = IO::load(v.sq + o, count);
  step_lanes<scalar_t, kRaw, kGrads, 2, kNext, false, false, true>(in, k, Pack{}, ds, os, g_pred, g_target, g_raw,
                                                                    &sq);
  IO::store(v.sq + o, sq, count);
  if constexpr (kGrads) {
    if (v.gp) IO::store_gradient(v.gp + i, g_pred, count, stream);
    if constexpr (kTarget) IO::store_gradient(v.gt + i, g_target, count, stream);
    if constexpr (kRaw) {
      if (v.gr) IO::store_gradient(v.gr + i, g_raw, count, stream);
    }
  }
}

// Elements [i0, i1) of a flat run, i0 at position o of the period; kNext:
// each of their frames gets its next frame's velocity share. The running
// sums come in and go out by value and live in locals meanwhile.
template <typename scalar_t, bool kRaw, bool kGrads, bool kNext, bool kTarget>
FrameSums<typename Io<scalar_t>::AVec> flat_range(const FlatView<scalar_t> v, const FrameCoefficients<scalar_t> k,
                                                  int64_t i0, int64_t i1, int64_t o,
                                                  const FrameSums<typename Io<scalar_t>::AVec> sums) {
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  using AVec = typename Io<scalar_t>::AVec;
  DiffSums<AVec> ds{sums.sq, sums.abs, sums.perceptual};
  OtherSums<AVec> os{sums.temporal, sums.smoothing, sums.velocity};
  // Steps start where the element index over all B * T frames is a multiple
  // of kStep (after a shorter first step), as the row kernel's flat steps do:
  // a whole step's gradients then fill whole aligned 32-byte blocks (where
  // the buffers are 32-byte aligned; the gradient pool's and torch's are
  // 64-byte aligned), which store_streaming writes with one instruction per
  // vector; and which elements share a step depends on the shapes and the
  // valid frames only, never on addresses or on streaming.
  int64_t i = i0;
  const int64_t head = std::min(i1 - i0, ((v.first_step - i0) % kStep + kStep) % kStep);
  if (head > 0) {
    flat_step<scalar_t, kRaw, kGrads, kNext, kTarget>(v, k, i, o, head, false, ds, os);
    i += head;
    o += head;
    if (o >= v.period) o -= v.period;
  }
  for (; i + kStep <= i1; i += kStep) {
    flat_step<scalar_t, kRaw, kGrads, kNext, kTarget>(v, k, i, o, kStep, v.stream, ds, os);
    o += kStep;
    if (o >= v.period) o -= v.period;
  }
  if (i < i1) flat_step<scalar_t, kRaw, kGrads, kNext, kTarget>(v, k, i, o, i1 - i, false, ds, os);
  return {ds.sq, ds.abs, ds.perceptual, os.temporal, os.smoothing, os.velocity};
}

// Frames [fa, fb) of one window, all kFrameFull with t >= 1, contiguous:
// one array. next_last: frame fb is in P_v of the same window (its velocity
// share goes to frame fb-1); every earlier frame's next frame is in the run.
template <typename scalar_t, bool kRaw, bool kGrads>
FrameSums<typename Io<scalar_t>::AVec> run_flat(const SequenceProblem<scalar_t>& pb,
                                                const FrameCoefficients<scalar_t>& k, int64_t fa, int64_t fb,
                                                bool next_last, typename Io<scalar_t>::acc_t* sq,
                                                FrameSums<typename Io<scalar_t>::AVec> acc) {
  const int64_t T = pb.frames, C = pb.cols;
  const int64_t b = fa / T, t = fa - b * T;
  FlatView<scalar_t> v;
  v.pred = pb.pred + b * pb.ps[0] + t * C;
  v.target = pb.target + b * pb.ts[0] + t * C;
  v.raw = kRaw ? pb.raw + b * pb.rs[0] + t * C : nullptr;
  v.gp = pb.grad_pred ? pb.grad_pred + fa * C : nullptr;
  v.gt = pb.grad_target ? pb.grad_target + fa * C : nullptr;
  v.gr = pb.grad_raw ? pb.grad_raw + fa * C : nullptr;
  v.kd = pb.flat_kd;
  v.kd_keep = pb.flat_kd_keep;
  v.sq = sq;
  v.cols = C;
  v.period = pb.period;
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  v.first_step = (kStep - (fa * C) % kStep) % kStep;
  v.stream = pb.stream;
  v.prefetch = pb.stream && C * static_cast<int64_t>(sizeof(scalar_t)) <= kPrefetchMaxFrameBytes;
  const int64_t n = (fb - fa) * C;
  const auto range = [&](auto next, int64_t i0, int64_t i1, FrameSums<typename Io<scalar_t>::AVec> sums) {
    constexpr bool kNext = decltype(next)::value;
    if (kGrads && v.gt) return flat_range<scalar_t, kRaw, kGrads, kNext, kGrads>(v, k, i0, i1, i0 % v.period, sums);
    return flat_range<scalar_t, kRaw, kGrads, kNext, false>(v, k, i0, i1, i0 % v.period, sums);
  };
  if constexpr (kGrads) {
    if (k.velocity_on) {  // frames with a next frame's share, then the last one without
      const int64_t coupled = next_last ? n : n - C;
      return range(std::false_type{}, coupled, n, range(std::true_type{}, 0, coupled, acc));
    }
  }
  return range(std::false_type{}, 0, n, acc);
}

// ------------------------------------------------------------------- chunks

// Padded frames' gradients: zeros, streamed like the flat runs' gradients.
template <typename scalar_t>
KF_HD void store_zero_rows(grad_storage_t<scalar_t>* g, int64_t n, bool stream) {
  if (g) store_zeros(g, n, stream);
}

template <class AVec>
KF_HD AVec zero_vec() {
  return AVec(typename AVec::value_type(0));
}

// Frames [f0, f1) of the flattened (B * T) frame index: one chunk.
template <typename scalar_t, bool kRaw, bool kGrads>
SequenceSums run_chunk(const SequenceProblem<scalar_t>& shared, int64_t f0, int64_t f1) {
  // A private copy: gradient stores could alias the shared struct (see run_rows).
  const SequenceProblem<scalar_t> pb = shared;
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;

  const int64_t T = pb.frames, C = pb.cols, N = pb.batch * pb.frames;

  // Pointers of frame f = (b, t); q / s only when t > 0 or prev is given.
  const auto view = [&](int64_t f, int64_t t) {
    const int64_t b = f / T;
    FrameView<scalar_t> v;
    v.pred = pb.pred + b * pb.ps[0] + t * pb.ps[1];
    v.target = pb.target + b * pb.ts[0] + t * pb.ts[1];
    v.raw = kRaw ? pb.raw + b * pb.rs[0] + t * pb.rs[1] : nullptr;
    v.pred_c = pb.ps[2];
    v.target_c = pb.ts[2];
    v.raw_c = pb.rs[2];
    if (t > 0) {
      v.q = v.pred - pb.ps[1];
      v.s = v.target - pb.ts[1];
      v.q_c = pb.ps[2];
      v.s_c = pb.ts[2];
    } else {
      v.q = pb.prev ? pb.prev + b * pb.prev_s[0] : nullptr;
      v.s = pb.prev_target ? pb.prev_target + b * pb.prev_target_s[0] : nullptr;
      v.q_c = pb.prev_s[1];
      v.s_c = pb.prev_target_s[1];
    }
    v.pn = v.pred + pb.ps[1];
    v.gn = v.target + pb.ts[1];
    v.gp = pb.grad_pred ? pb.grad_pred + f * C : nullptr;
    v.gt = pb.grad_target ? pb.grad_target + f * C : nullptr;
    v.gr = pb.grad_raw ? pb.grad_raw + f * C : nullptr;
    return v;
  };
  // Frame f+1 (t+1 in the same window) sends a velocity share to frame f:
  // its velocity coefficient, 0 when it sends none.
  const auto next_velocity = [&](int64_t f, int64_t t) {
    if (!kGrads || t + 1 >= T || f + 1 >= N || !(pb.flags[f + 1] & kFrameVelocityPair)) return acc_t(0);
    return pb.k_velocity * frame_scale_of(pb, f + 1);
  };

  const AVec zero = zero_vec<AVec>();
  FrameSums<AVec> chunk{zero, zero, zero, zero, zero, zero};
  const bool flat = pb.period > 0;
  FrameCoefficients<scalar_t> flat_k = frame_coefficients(pb, 0);  // flat runs: no frame_scale
  flat_k.velocity_next = flat_k.velocity;
  const int64_t positions = flat ? pb.period + IO::kStep : 0;
  ScratchBuffer<acc_t, kMaxFlatPeriod + 64> flat_sq(positions);
  int64_t t = f0 % T;
  for (int64_t f = f0; f < f1;) {
    const uint8_t flags = pb.flags[f];
    if (flat && t > 0 && flags == kFrameFull) {  // a flat run: frames [f, fb) of this window
      int64_t fb = f + 1, tb = t + 1;
      for (; fb < f1 && tb < T && pb.flags[fb] == kFrameFull; ++fb, ++tb) {
      }
      const bool next_last = next_velocity(fb - 1, tb - 1) != acc_t(0);
      chunk = run_flat<scalar_t, kRaw, kGrads>(pb, flat_k, f, fb, next_last, flat_sq.data(), chunk);
      f = fb;
      t = tb == T ? 0 : tb;
      continue;
    }
    if (!(flags & kFrameValid)) {  // frames [f, fb) never read; gradients exactly 0
      int64_t fb = f + 1;
      while (fb < f1 && !(pb.flags[fb] & kFrameValid)) ++fb;
      if constexpr (kGrads) {
        store_zero_rows<scalar_t>(pb.grad_pred ? pb.grad_pred + f * C : nullptr, (fb - f) * C, pb.stream);
        store_zero_rows<scalar_t>(pb.grad_target ? pb.grad_target + f * C : nullptr, (fb - f) * C, pb.stream);
        store_zero_rows<scalar_t>(pb.grad_raw ? pb.grad_raw + f * C : nullptr, (fb - f) * C, pb.stream);
      }
      if (pb.frame_terms) {
        std::fill(pb.frame_terms + f * kNumSequenceTerms, pb.frame_terms + fb * kNumSequenceTerms, acc_t(0));
        std::fill(pb.frame_total + f, pb.frame_total + fb, acc_t(0));
      }
      t = (t + (fb - f)) % T;
      f = fb;
      continue;
    }
    const FrameView<scalar_t> fv = view(f, t);
    FrameCoefficients<scalar_t> k = frame_coefficients(pb, f);
    const acc_t vn = next_velocity(f, t);
    k.velocity_next = AVec(vn);
    const bool next = vn != acc_t(0);
    const FrameSums<AVec> acc = (flags & kFrameVelocityPair)
                                    ? run_frame_next<scalar_t, kRaw, kGrads, 2>(pb, fv, k, next)
                                : (flags & kFramePair) ? run_frame_next<scalar_t, kRaw, kGrads, 1>(pb, fv, k, next)
                                                       : run_frame_next<scalar_t, kRaw, kGrads, 0>(pb, fv, k, next);

    if (pb.frame_terms) {  // reduction "none": this frame's six terms and total
      const double scale = static_cast<double>(k.scale);
      SequenceSums terms = term_sums(acc, C);
      double total = 0.0;
      acc_t* out = pb.frame_terms + f * kNumSequenceTerms;
      for (int i = 0; i < kNumSequenceTerms; ++i) {
        terms[i] *= scale;
        out[i] = static_cast<acc_t>(terms[i]);
        if (pb.weights[i] > 0.0) total += pb.weights[i] * terms[i];
      }
      pb.frame_total[f] = static_cast<acc_t>(total);
    } else if (pb.frame_scale) {
      const AVec scale(k.scale);
      chunk.sq = at::vec::fmadd(acc.sq, scale, chunk.sq);
      chunk.abs = at::vec::fmadd(acc.abs, scale, chunk.abs);
      chunk.perceptual = at::vec::fmadd(acc.perceptual, scale, chunk.perceptual);
      chunk.temporal = at::vec::fmadd(acc.temporal, scale, chunk.temporal);
      chunk.smoothing = at::vec::fmadd(acc.smoothing, scale, chunk.smoothing);
      chunk.velocity = at::vec::fmadd(acc.velocity, scale, chunk.velocity);
    } else {
      chunk.sq = chunk.sq + acc.sq;
      chunk.abs = chunk.abs + acc.abs;
      chunk.perceptual = chunk.perceptual + acc.perceptual;
      chunk.temporal = chunk.temporal + acc.temporal;
      chunk.smoothing = chunk.smoothing + acc.smoothing;
      chunk.velocity = chunk.velocity + acc.velocity;
    }
    ++f;
    if (++t == T) t = 0;
  }
  if (pb.stream) store_fence();
  for (int64_t o = 0; o < positions; o += AVec::size()) {  // the flat runs' d^2, weighed once
    const AVec v = AVec::loadu(flat_sq.data() + o), w = AVec::loadu(pb.flat_colw + o);
    chunk.sq = chunk.sq + v;
    chunk.perceptual = chunk.perceptual + (AVec::loadu(pb.flat_colw_keep + o) & (w * v));
  }
  return term_sums(chunk, C);
}

template <typename scalar_t, bool kRaw, bool kGrads>
void sequence_typed(SequenceArgs& a) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  using grad_t = grad_storage_t<scalar_t>;
  constexpr int64_t kStep = IO::kStep;
  const int64_t C = a.cols, N = a.batch * a.frames;

  SequenceProblem<scalar_t> pb;
  pb.pred = static_cast<const scalar_t*>(a.pred);
  pb.target = static_cast<const scalar_t*>(a.target);
  pb.raw = static_cast<const scalar_t*>(a.raw);
  pb.prev = static_cast<const scalar_t*>(a.prev);
  pb.prev_target = static_cast<const scalar_t*>(a.prev_target);
  std::copy(a.pred_strides, a.pred_strides + 3, pb.ps);
  std::copy(a.target_strides, a.target_strides + 3, pb.ts);
  std::copy(a.raw_strides, a.raw_strides + 3, pb.rs);
  std::copy(a.prev_strides, a.prev_strides + 2, pb.prev_s);
  std::copy(a.prev_target_strides, a.prev_target_strides + 2, pb.prev_target_s);
  pb.flags = a.flags;
  pb.frame_scale = static_cast<const acc_t*>(a.frame_scale);
  pb.grad_pred = static_cast<grad_t*>(a.grad_pred);
  pb.grad_target = static_cast<grad_t*>(a.grad_target);
  pb.grad_raw = static_cast<grad_t*>(a.grad_raw);
  pb.frame_terms = static_cast<acc_t*>(a.frame_terms);
  pb.frame_total = static_cast<acc_t*>(a.frame_total);
  pb.batch = a.batch;
  pb.frames = a.frames;
  pb.cols = C;
  pb.slots = (C + kStep - 1) / kStep * kStep;
  std::copy(a.weights, a.weights + kNumSequenceTerms, pb.weights);

  const double c = static_cast<double>(C);
  const double* w = a.weights;
  const double* den = a.denominators;
  pb.k_l1 = static_cast<acc_t>(w[kL1] / (c * den[kL1]));
  pb.k_smoothing = static_cast<acc_t>(w[kSmoothing] / (c * den[kSmoothing]));
  pb.k_temporal = static_cast<acc_t>(2.0 * w[kTemporal] / (c * den[kTemporal]));
  pb.k_velocity = static_cast<acc_t>(2.0 * w[kVelocity] / (c * den[kVelocity]));

  // Flat runs (run_flat): pred, target and raw with column stride 1 and
  // frame stride C, one scale for every frame, reduction "mean" / "sum".
  const auto packed = [&](const int64_t* s) { return s[2] == 1 && s[1] == C; };
  const int64_t period = std::lcm(C, kStep);
  const bool flat = packed(pb.ps) && packed(pb.ts) && (!kRaw || packed(pb.rs)) && !pb.frame_scale &&
                    !pb.frame_terms && period <= kMaxFlatPeriod;
  pb.period = flat ? period : 0;
  // Large calls stream their gradients (kStreamingStoreBytes). The flat runs'
  // whole steps start on multiples of kStep elements of the batch
  // (flat_range), so they are aligned where the buffers are.
  pb.stream = kGrads && flat &&
              streams_gradients<scalar_t>(N * C, kRaw ? 3 : 2,
                                          !!pb.grad_pred + !!pb.grad_target + !!pb.grad_raw) &&
              streamable(pb.grad_pred) && streamable(pb.grad_target) && streamable(pb.grad_raw);
  const int64_t positions = flat ? period + kStep : 0;

  // Per-column tables, padded with zeros to whole steps, then the flat
  // runs' per-position ones.
  const auto* colw = static_cast<const acc_t*>(a.column_weights);
  ScratchBuffer<acc_t, 2048> tables(4 * pb.slots + 4 * positions);
  acc_t* kd = tables.data();
  acc_t* kd_keep = kd + pb.slots;
  acc_t* cw = kd_keep + pb.slots;
  acc_t* cw_keep = cw + pb.slots;
  const auto lane_mask = [](bool on) {
    const Bits<acc_t> bits = on ? ~Bits<acc_t>(0) : Bits<acc_t>(0);
    acc_t m;
    std::memcpy(&m, &bits, sizeof(acc_t));
    return m;
  };
  for (int64_t i = 0; i < C; ++i) {
    kd[i] = static_cast<acc_t>(2.0 * w[kMse] / (c * den[kMse]) +
                               2.0 * w[kPerceptual] * static_cast<double>(colw[i]) / den[kPerceptual]);
    kd_keep[i] = lane_mask(kd[i] != acc_t(0));
    cw[i] = colw[i];
    cw_keep[i] = lane_mask(colw[i] != acc_t(0));
  }
  pb.kd = kd;
  pb.kd_keep = kd_keep;
  pb.colw = cw;
  pb.colw_keep = cw_keep;
  acc_t* flat_tables = tables.data() + 4 * pb.slots;
  for (int64_t o = 0; o < positions; ++o) {
    const int64_t i = o % C;
    flat_tables[o] = kd[i];
    flat_tables[positions + o] = kd_keep[i];
    flat_tables[2 * positions + o] = cw[i];
    flat_tables[3 * positions + o] = cw_keep[i];
  }
  pb.flat_kd = flat_tables;
  pb.flat_kd_keep = flat_tables + positions;
  pb.flat_colw = flat_tables + 2 * positions;
  pb.flat_colw_keep = flat_tables + 3 * positions;

  alignas(64) acc_t lanes[kStep];
  const int64_t full_end = C - C % kStep;
  for (int64_t i = 0; i < kStep; ++i) lanes[i] = (C - kStep + i) >= full_end ? 1 : 0;
  for (int j = 0; j < IO::kParts; ++j) {
    pb.tail_lanes[j] = AVec::loadu(lanes + j * AVec::size()) != AVec(acc_t(0));
  }

  // Chunks of whole frames, about kChunkElements elements each: a fixed
  // partition of the flattened frame index, whatever the thread count.
  const int64_t frames_per_chunk = std::max<int64_t>(1, kChunkElements / C);
  const int64_t chunks = (N + frames_per_chunk - 1) / frames_per_chunk;
  const int64_t chunk_grain = std::max<int64_t>(1, kMinElementsPerThread / (frames_per_chunk * C));
  const auto run = [&](int64_t ch) {
    const int64_t f0 = ch * frames_per_chunk;
    return run_chunk<scalar_t, kRaw, kGrads>(pb, f0, std::min(N, f0 + frames_per_chunk));
  };
  SequenceSums sums{};
  if (chunks == 1) {
    sums = run(0);
  } else if (chunks > 1) {
    std::vector<SequenceSums> partial(chunks);
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) partial[ch] = run(ch);
    });
    for (const SequenceSums& p : partial) {  // fixed order: independent of the thread count
      for (int i = 0; i < kNumSequenceTerms; ++i) sums[i] += p[i];
    }
  }
  for (int i = 0; i < kNumSequenceTerms; ++i) a.sums[i] = sums[i];
}

template <typename scalar_t>
void sequence_with_inputs(SequenceArgs& a) {
  const bool grads = a.grad_pred || a.grad_target || a.grad_raw;
  if (a.raw) {
    if (grads) sequence_typed<scalar_t, true, true>(a);
    else sequence_typed<scalar_t, true, false>(a);
  } else {
    if (grads) sequence_typed<scalar_t, false, true>(a);
    else sequence_typed<scalar_t, false, false>(a);
  }
}

void sequence_kernel(SequenceArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: sequence_with_inputs<float>(args); break;
    case c10::ScalarType::Double: sequence_with_inputs<double>(args); break;
    case c10::ScalarType::Half: sequence_with_inputs<c10::Half>(args); break;
    case c10::ScalarType::BFloat16: sequence_with_inputs<c10::BFloat16>(args); break;
    default: TORCH_CHECK_TYPE(false, "koemorph_fused: unsupported dtype ", args.dtype);
  }
}

}  // namespace koemorph_fused::cpu::CPU_CAPABILITY
