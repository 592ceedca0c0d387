// The CPU kernel of the sequence loss (windows of frames (B, T, C)),
// compiled once per instruction set like cpu_loss_kernel.h: include it from a
// translation unit that first defines CPU_CAPABILITY.
//
// One design with the row kernel: the lane formulas of loss_math.h, the
// Io<> loads and stores of cpu_vector_lanes.h, chunks of a fixed size whose
// partial sums are added in chunk order (bitwise the same for any thread
// count), gradients stored as grad_storage_t.
//
// Frames are processed one after another. The previous frame pred[b, t-1]
// (and target[b, t-1]) is read in place, where it was read one frame before
// (still in L1); at t = 0 the previous frame is prev[b] / prev_target[b].
// The velocity term of frame t moves frames t and t-1, so a frame's gradient
// is kept in a C-sized "pending" buffer in the accumulation type until the
// next frame has added its share, and only then stored, once. A chunk that
// ends inside a window finishes its last frame with the velocity share of
// the next frame (computed the same way, bit for bit, by the next chunk).
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_sequence_kernel.h"
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_sequence_kernel_args.h"
#include "cpu_vector_lanes.h"
#include "loss_math.h"

namespace koemorph_fused::cpu::CPU_CAPABILITY {

using SequenceSums = std::array<double, kNumSequenceTerms>;

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
  grad_t *grad_pred, *grad_target, *grad_raw;
  acc_t *frame_terms, *frame_total;
  int64_t batch, frames, cols, slots;
  double weights[kNumSequenceTerms];
  // Gradient coefficients before the frame's scale: w_l1/(C den), w_s/(C den),
  // 2 w_t/(C den), 2 w_v/(C den).
  acc_t k_l1, k_smoothing, k_temporal, k_velocity;
  // When C is not a multiple of the step, a frame's last step re-reads its
  // final kStep columns (into its own slot); tail_lanes selects the lanes the
  // earlier steps had not covered, so that nothing is summed twice.
  Pack tail_lanes;
};

// The coefficients of one frame: the call's, times the frame's scale. Both
// chunks that touch a frame compute them with this function, so a frame's
// velocity share is the same bits in each.
template <typename scalar_t>
struct FrameCoefficients {
  using AVec = typename Io<scalar_t>::AVec;
  using acc_t = typename Io<scalar_t>::acc_t;
  acc_t scale;
  AVec kd_scale, temporal, velocity;
  // scaled_sign needs a coefficient >= 0: l1 and smoothing hold |scale| times
  // theirs, and `flip` (the sign bit of a negative scale) is XORed in after.
  AVec l1, smoothing, flip;
  bool temporal_on, velocity_on;  // the coefficient is not 0 (0 * NaN must not leak)
};

template <typename scalar_t>
KF_HD FrameCoefficients<scalar_t> frame_coefficients(const SequenceProblem<scalar_t>& pb, int64_t f) {
  using acc_t = typename Io<scalar_t>::acc_t;
  using AVec = typename Io<scalar_t>::AVec;
  FrameCoefficients<scalar_t> k;
  k.scale = pb.frame_scale ? pb.frame_scale[f] : acc_t(1);
  const acc_t t = pb.k_temporal * k.scale, v = pb.k_velocity * k.scale;
  const acc_t magnitude = k.scale < acc_t(0) ? -k.scale : k.scale;
  k.kd_scale = AVec(k.scale);
  k.l1 = AVec(pb.k_l1 * magnitude);
  k.smoothing = AVec(pb.k_smoothing * magnitude);
  k.flip = AVec(k.scale < acc_t(0) ? acc_t(-0.0) : acc_t(0));
  k.temporal = AVec(t);
  k.velocity = AVec(v);
  k.temporal_on = t != acc_t(0);
  k.velocity_on = v != acc_t(0);
  return k;
}

// Where one frame's steps read and write.
template <typename scalar_t>
struct FrameView {
  using acc_t = typename Io<scalar_t>::acc_t;
  using grad_t = grad_storage_t<scalar_t>;
  const scalar_t *pred, *target, *raw;
  const scalar_t *q, *s;  // the previous frame's pred and target (or prev, prev_target)
  int64_t pred_c, target_c, raw_c, q_c, s_c;  // column strides
  grad_t *gp, *gt, *gr;            // this frame's gradient rows; nullptr: not requested
  grad_t *gp_prev, *gt_prev;       // the previous frame's
  acc_t *pend_p, *pend_t;          // pending gradients, by slot
};

// Running sums of one frame (then folded into the chunk's, times the
// frame's scale, or written out for reduction "none").
template <class AVec>
struct FrameSums {
  AVec sq, abs, perceptual, temporal, smoothing, velocity;
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

// One step of frame f: kPair 0 (no pair), 1 (in P), 2 (in P and P_v);
// kCouple: the previous frame's pending gradient gets this frame's velocity
// share and is stored.
template <typename scalar_t, bool kRaw, bool kGrads, int kPair, bool kCouple, bool kOverlap>
KF_HD void frame_step(const SequenceProblem<scalar_t>& pb, const FrameView<scalar_t>& fv,
                      const FrameCoefficients<scalar_t>& k, int64_t c, int64_t o, int64_t count,
                      FrameSums<typename Io<scalar_t>::AVec>& acc) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;
  static_assert(!kCouple || (kPair == 2 && kGrads), "velocity couples frames of a velocity pair");

  const Pack p = load_columns(fv.pred, fv.pred_c, c, count);
  const Pack g = load_columns(fv.target, fv.target_c, c, count);
  Pack r{}, q{}, s{}, kd{}, kd_keep{}, pend_p{}, pend_t{};
  if constexpr (kRaw) r = load_columns(fv.raw, fv.raw_c, c, count);
  if constexpr (kPair >= 1) q = load_columns(fv.q, fv.q_c, c, count);
  if constexpr (kPair == 2) s = load_columns(fv.s, fv.s_c, c, count);
  const Pack cw = IO::load(pb.colw + c, count), cw_keep = IO::load(pb.colw_keep + c, count);
  if constexpr (kGrads) {
    kd = IO::load(pb.kd + c, count);
    kd_keep = IO::load(pb.kd_keep + c, count);
    if constexpr (kCouple) {
      pend_p = IO::load(fv.pend_p + o, count);
      if (fv.gt_prev) pend_t = IO::load(fv.pend_t + o, count);
    }
  }

  Pack g_pred, g_target, g_raw, done_pred, done_target;
  for (int j = 0; j < IO::kParts; ++j) {
    AVec d = p[j] - g[j];
    AVec e, u, sm;
    if constexpr (kPair >= 1) e = p[j] - q[j];             // pred[t] - pred[t-1]
    if constexpr (kPair == 2) u = e - (g[j] - s[j]);      // velocity residual
    if constexpr (kRaw) sm = p[j] - r[j];
    if constexpr (kGrads) {
      // difference_gradient of loss_math.h, its keep_nonzero mask precomputed.
      const AVec gd = (kd_keep[j] & (kd[j] * k.kd_scale * d)) + (Lanes<AVec>::scaled_sign(d, k.l1) ^ k.flip);
      AVec gp = gd, gt = gd.neg();
      if constexpr (kPair >= 1) {
        if (k.temporal_on) gp = gp + temporal_gradient(e, k.temporal);  // pred[t-1] detached
      }
      if constexpr (kRaw) {
        const AVec gs = smoothing_gradient(sm, k.smoothing) ^ k.flip;
        gp = gp + gs;
        g_raw[j] = gs.neg();
      }
      if constexpr (kPair == 2) {
        if (k.velocity_on) {
          const AVec vg = temporal_gradient(u, k.velocity);  // same form: coefficient * residual
          gp = gp + vg;
          gt = gt - vg;
          if constexpr (kCouple) {
            done_pred[j] = pend_p[j] - vg;
            done_target[j] = pend_t[j] + vg;
          }
        }
      }
      g_pred[j] = gp;
      g_target[j] = gt;
    }
    if constexpr (kOverlap) {  // lanes already counted become +0
      d = pb.tail_lanes[j] & d;
      if constexpr (kPair >= 1) e = pb.tail_lanes[j] & e;
      if constexpr (kPair == 2) u = pb.tail_lanes[j] & u;
      if constexpr (kRaw) sm = pb.tail_lanes[j] & sm;
    }
    const AVec d2 = d * d;
    acc.sq = acc.sq + d2;
    acc.abs = acc.abs + Lanes<AVec>::abs(d);
    acc.perceptual = acc.perceptual + (cw_keep[j] & (cw[j] * d2));  // colw = 0: not in the term
    if constexpr (kPair >= 1) acc.temporal = at::vec::fmadd(e, e, acc.temporal);
    if constexpr (kPair == 2) acc.velocity = at::vec::fmadd(u, u, acc.velocity);
    if constexpr (kRaw) acc.smoothing = acc.smoothing + Lanes<AVec>::abs(sm);
  }

  if constexpr (kGrads) {
    if constexpr (kCouple) {
      if (fv.gp_prev) IO::store(fv.gp_prev + c, done_pred, count);
      if (fv.gt_prev) IO::store(fv.gt_prev + c, done_target, count);
    }
    IO::store(fv.pend_p + o, g_pred, count);
    if (fv.gt) IO::store(fv.pend_t + o, g_target, count);
    if constexpr (kRaw) {
      if (fv.gr) IO::store(fv.gr + c, g_raw, count);
    }
  }
}

// Calls fn(c, o, count, overlap) for each step of a frame of C columns: full
// steps, then (C not a multiple of kStep) either one overlapping step over
// the final kStep columns into its own slot, or, when C < kStep, one partial step.
template <int64_t kStep, class Fn>
KF_HD void for_each_step(int64_t cols, Fn&& fn) {
  const int64_t full_end = cols - cols % kStep;
  int64_t c = 0;
  for (; c < full_end; c += kStep) fn(c, c, kStep, std::false_type{});
  if (c < cols) {
    if (cols >= kStep) fn(cols - kStep, c, kStep, std::true_type{});
    else fn(c, c, cols - c, std::false_type{});
  }
}

template <typename scalar_t, bool kRaw, bool kGrads, int kPair, bool kCouple>
KF_HD void run_frame(const SequenceProblem<scalar_t>& pb, const FrameView<scalar_t>& fv,
                     const FrameCoefficients<scalar_t>& k, FrameSums<typename Io<scalar_t>::AVec>& acc) {
  for_each_step<Io<scalar_t>::kStep>(pb.cols, [&](int64_t c, int64_t o, int64_t count, auto overlap) {
    frame_step<scalar_t, kRaw, kGrads, kPair, kCouple, decltype(overlap)::value>(pb, fv, k, c, o, count, acc);
  });
}

// The pending gradients of a frame, stored as they are (its next frame adds
// no velocity share).
template <typename scalar_t>
KF_HD void store_pending(int64_t cols, const typename Io<scalar_t>::acc_t* pend_p,
                         const typename Io<scalar_t>::acc_t* pend_t, grad_storage_t<scalar_t>* gp,
                         grad_storage_t<scalar_t>* gt) {
  using IO = Io<scalar_t>;
  for_each_step<IO::kStep>(cols, [&](int64_t c, int64_t o, int64_t count, auto) {
    if (gp) IO::store(gp + c, IO::load(pend_p + o, count), count);
    if (gt) IO::store(gt + c, IO::load(pend_t + o, count), count);
  });
}

// The velocity share of frame f (the first frame of the next chunk) in the
// gradients of frame f-1, added to f-1's pending gradients and stored: the
// same expressions as frame_step's, so the same bits.
template <typename scalar_t>
KF_HD void finish_with_next(const SequenceProblem<scalar_t>& pb, const FrameView<scalar_t>& fv,
                            const FrameCoefficients<scalar_t>& k) {
  using IO = Io<scalar_t>;
  using AVec = typename IO::AVec;
  using Pack = typename IO::Pack;
  for_each_step<IO::kStep>(pb.cols, [&](int64_t c, int64_t o, int64_t count, auto) {
    const Pack p = load_columns(fv.pred, fv.pred_c, c, count);
    const Pack g = load_columns(fv.target, fv.target_c, c, count);
    const Pack q = load_columns(fv.q, fv.q_c, c, count);
    const Pack s = load_columns(fv.s, fv.s_c, c, count);
    const Pack pend_p = IO::load(fv.pend_p + o, count);
    Pack pend_t{};
    if (fv.gt_prev) pend_t = IO::load(fv.pend_t + o, count);
    Pack done_pred, done_target;
    for (int j = 0; j < IO::kParts; ++j) {
      const AVec e = p[j] - q[j];
      const AVec u = e - (g[j] - s[j]);
      const AVec vg = temporal_gradient(u, k.velocity);
      done_pred[j] = pend_p[j] - vg;
      done_target[j] = pend_t[j] + vg;
    }
    if (fv.gp_prev) IO::store(fv.gp_prev + c, done_pred, count);
    if (fv.gt_prev) IO::store(fv.gt_prev + c, done_target, count);
  });
}

template <typename scalar_t>
KF_HD void store_zero_row(grad_storage_t<scalar_t>* g, int64_t cols) {
  if (g) std::fill(g, g + cols, grad_storage_t<scalar_t>(0));
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
  using grad_t = grad_storage_t<scalar_t>;

  const int64_t T = pb.frames, C = pb.cols, N = pb.batch * pb.frames;
  ScratchBuffer<acc_t, 256> pending(kGrads ? 2 * pb.slots : 0);
  acc_t* pend_p = pending.data();
  acc_t* pend_t = pending.data() + (kGrads ? pb.slots : 0);

  // Pointers of frame f (b, t); q / s only when the frame has a pair.
  const auto view = [&](int64_t f) {
    const int64_t b = f / T, t = f - b * T;
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
    v.gp = pb.grad_pred ? pb.grad_pred + f * C : nullptr;
    v.gt = pb.grad_target ? pb.grad_target + f * C : nullptr;
    v.gr = pb.grad_raw ? pb.grad_raw + f * C : nullptr;
    v.gp_prev = pb.grad_pred && f > 0 ? pb.grad_pred + (f - 1) * C : nullptr;
    v.gt_prev = pb.grad_target && f > 0 ? pb.grad_target + (f - 1) * C : nullptr;
    v.pend_p = pend_p;
    v.pend_t = pend_t;
    return v;
  };

  const AVec zero = zero_vec<AVec>();
  FrameSums<AVec> chunk{zero, zero, zero, zero, zero, zero};
  bool pending_frame = false;  // frame f-1's gradients wait in pend_p / pend_t
  for (int64_t f = f0; f < f1; ++f) {
    const uint8_t flags = pb.flags[f];
    const FrameView<scalar_t> fv = view(f);
    const FrameCoefficients<scalar_t> k = frame_coefficients(pb, f);
    const bool velocity_pair = (flags & kFrameVelocityPair) != 0;
    // f-1 pending implies it is valid; t > 0 keeps it in the same window.
    const bool couple = kGrads && pending_frame && (f % T) != 0 && velocity_pair && k.velocity_on;
    if (kGrads && pending_frame && !couple) store_pending<scalar_t>(C, pend_p, pend_t, fv.gp_prev, fv.gt_prev);
    pending_frame = false;
    if (!(flags & kFrameValid)) {  // never read; gradients exactly 0
      if constexpr (kGrads) {
        store_zero_row<scalar_t>(fv.gp, C);
        store_zero_row<scalar_t>(fv.gt, C);
        store_zero_row<scalar_t>(fv.gr, C);
      }
      if (pb.frame_terms) {
        std::fill(pb.frame_terms + f * kNumSequenceTerms, pb.frame_terms + (f + 1) * kNumSequenceTerms, acc_t(0));
        pb.frame_total[f] = acc_t(0);
      }
      continue;
    }
    FrameSums<AVec> acc{zero, zero, zero, zero, zero, zero};
    if (velocity_pair) {
      if (couple) run_frame<scalar_t, kRaw, kGrads, 2, kGrads>(pb, fv, k, acc);
      else run_frame<scalar_t, kRaw, kGrads, 2, false>(pb, fv, k, acc);
    } else if (flags & kFramePair) {
      run_frame<scalar_t, kRaw, kGrads, 1, false>(pb, fv, k, acc);
    } else {
      run_frame<scalar_t, kRaw, kGrads, 0, false>(pb, fv, k, acc);
    }
    pending_frame = kGrads;

    if (pb.frame_terms) {  // reduction "none": this frame's six terms and total
      const double inv_c = 1.0 / static_cast<double>(C), scale = static_cast<double>(k.scale);
      double t[kNumSequenceTerms];
      t[kMse] = horizontal_sum(acc.sq) * inv_c;
      t[kL1] = horizontal_sum(acc.abs) * inv_c;
      t[kPerceptual] = horizontal_sum(acc.perceptual);
      t[kTemporal] = horizontal_sum(acc.temporal) * inv_c;
      t[kSmoothing] = horizontal_sum(acc.smoothing) * inv_c;
      t[kVelocity] = horizontal_sum(acc.velocity) * inv_c;
      double total = 0.0;
      acc_t* out = pb.frame_terms + f * kNumSequenceTerms;
      for (int i = 0; i < kNumSequenceTerms; ++i) {
        t[i] *= scale;
        out[i] = static_cast<acc_t>(t[i]);
        if (pb.weights[i] > 0.0) total += pb.weights[i] * t[i];
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
  }
  if (kGrads && pending_frame) {  // the chunk's last frame, f1 - 1
    const bool next_in_window = f1 < N && (f1 % T) != 0 && (pb.flags[f1] & kFrameVelocityPair);
    if (next_in_window && frame_coefficients(pb, f1).velocity_on) {
      finish_with_next(pb, view(f1), frame_coefficients(pb, f1));
    } else {
      grad_t* gp = pb.grad_pred ? pb.grad_pred + (f1 - 1) * C : nullptr;
      grad_t* gt = pb.grad_target ? pb.grad_target + (f1 - 1) * C : nullptr;
      store_pending<scalar_t>(C, pend_p, pend_t, gp, gt);
    }
  }
  const double inv_c = 1.0 / static_cast<double>(C);
  SequenceSums out;
  out[kMse] = horizontal_sum(chunk.sq) * inv_c;
  out[kL1] = horizontal_sum(chunk.abs) * inv_c;
  out[kPerceptual] = horizontal_sum(chunk.perceptual);
  out[kTemporal] = horizontal_sum(chunk.temporal) * inv_c;
  out[kSmoothing] = horizontal_sum(chunk.smoothing) * inv_c;
  out[kVelocity] = horizontal_sum(chunk.velocity) * inv_c;
  return out;
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

  // Per-column tables, padded with zeros to whole steps.
  const auto* colw = static_cast<const acc_t*>(a.column_weights);
  ScratchBuffer<acc_t, 1024> tables(4 * pb.slots);
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
