// CUDA implementations of the koemorph_fused operators.
//
// temporal_loss_forward: ONE grid-stride kernel reads every element once,
// writes the requested gradients and reduces the five sums. Each block
// publishes its sums; the last block to finish (threadfence + atomic ticket)
// adds them in block order and finishes the terms with finish_terms(), so the
// result is bitwise the same run to run (no floating-point atomics).
//
//   * The ticket counter lives in a per-call workspace from the caching
//     allocator, zeroed by cudaMemsetAsync on the current stream. A shared
//     persistent counter would be raced by concurrent streams and by graph
//     replays; a per-call one is stream-ordered, and under graph capture it
//     comes from the graph's private pool with the memset as a graph node.
//     The last block still resets it, so a launch never depends on the memset
//     of the previous one.
//   * With a continuity mask the temporal gradient needs 1/sum(mask) before
//     any gradient is written, and only a grid-wide barrier could give that
//     inside one launch. So (mask case only) a small pre-kernel sums the mask
//     with the same deterministic block-partials scheme first.
//
// Work items are (row, group of V columns); V elements are one 16-byte (or
// 8-byte) vector when every row of every operand is aligned for it, else
// V = 1. A row whose width is not a multiple of V ends in a partial item read
// element by element. The per-element math is loss_math.h's, on scalars.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

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

// Forward blocks per SM that ptxas must allow: left to itself it squeezed
// some variants into 48-64 registers and spilled; with this bound it may use
// up to 65536 / (256 * 2) = 128 (it takes at most 84 on sm_90, no spills).
constexpr int kForwardMinBlocks = 2;

// Workspace: [counter | pad | mask_sum | partials...], 8-byte slots.
constexpr int64_t kCounterSlot = 0;
constexpr int64_t kMaskSumSlot = 1;
constexpr int64_t kPartialsSlot = 2;

// ---------------------------------------------------------------------------
// sum_r m_r, before the forward kernel (mask case only).

// A mask of another dtype (bool, as continuity_mask makes, integers, ...) is
// converted here, into `converted` (rows values of acc_t in the workspace),
// instead of by a separate cast kernel and allocation; nullptr when the mask
// is already acc_t.
template <typename acc_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    mask_sum_kernel(const mask_t* __restrict__ mask, int64_t rows, acc_t* __restrict__ converted,
                    double* workspace) {
  double v[1] = {0.0};
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows; i += step) {
    const acc_t m = static_cast<acc_t>(mask[i]);
    if (converted != nullptr) converted[i] = m;
    v[0] += static_cast<double>(m);
  }
  auto* counter = reinterpret_cast<unsigned int*>(workspace + kCounterSlot);
  if (grid_sum<1>(v, workspace + kPartialsSlot, counter) && threadIdx.x == 0) {
    workspace[kMaskSumSlot] = v[0];
  }
}

// ---------------------------------------------------------------------------
// The forward kernel.

template <typename scalar_t, typename grad_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pred;
  const scalar_t* target;
  const scalar_t* prev;  // nullptr: no temporal term
  const scalar_t* raw;   // nullptr: no smoothing term
  int64_t pred_stride, target_stride, prev_stride, raw_stride;  // row pitch, in elements
  const acc_t* mask;     // (rows,); nullptr: every m_r is 1
  const acc_t* colw;     // (cols,)
  grad_t* grad_pred;     // contiguous (rows, cols); nullptr: not requested
  grad_t* grad_target;
  grad_t* grad_raw;
  int64_t rows, cols;
  int64_t items_per_row;           // ceil(cols / V)
  int64_t step_rows, step_items;   // gridDim.x * kThreads = step_rows * items_per_row + step_items
  double weights[kNumTerms];       // host values, used when weights_dev is nullptr
  const double* weights_dev;       // (5,) float64 on the device (read by graph replays)
  double* workspace;               // see k*Slot; mask_sum valid when mask != nullptr
  acc_t* terms;                    // (5,)
  acc_t* total;                    // 0-dim
};

template <typename scalar_t, typename grad_t>
__device__ __forceinline__ void load_weights(const ForwardParams<scalar_t, grad_t>& p,
                                             double (&w)[kNumTerms]) {
#pragma unroll
  for (int i = 0; i < kNumTerms; ++i) {
    // Weights on the device cannot be checked without a host sync (host ones
    // are, in prepare_inputs): effective_weight() makes one that is not
    // finite and > 0 count as 0 in the total AND in every gradient.
    w[i] = effective_weight(p.weights_dev ? p.weights_dev[i] : p.weights[i]);
  }
}

// sum_r m_r: from the pre-kernel when there is a mask, else R.
template <typename scalar_t, typename grad_t>
__device__ __forceinline__ double mask_sum(const ForwardParams<scalar_t, grad_t>& p) {
  return p.mask ? p.workspace[kMaskSumSlot] : static_cast<double>(p.rows);
}

template <typename scalar_t, typename grad_t, int V, bool kHasPrev, bool kHasRaw>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks)
    forward_kernel(const ForwardParams<scalar_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;

  GradCoefficients<acc_t> k;
  acc_t temporal_row_scale;
  bool temporal_grad;
  {
    double w[kNumTerms];
    load_weights(p, w);
    k = make_coefficients<acc_t>(w, p.rows, p.cols);
    // As the CPU kernel: the row coefficient is (2*w_t/C / denom) * m_r.
    temporal_row_scale =
        static_cast<acc_t>(static_cast<double>(k.temporal) / temporal_denominator(mask_sum(p)));
    temporal_grad = kHasPrev && w[kTemporal] > 0.0;
  }

  LaneSums<acc_t> acc{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  acc_t temporal = acc_t(0);  // sum_r m_r * sum_c e^2

  // Item w = r * items_per_row + v, stepped by the grid size without dividing
  // in the loop: (r, v) advance by (step_rows, step_items) with one carry.
  // The first item is below 2^31, so one 32-bit division places it.
  const int64_t ipr = p.items_per_row;
  const unsigned int first = blockIdx.x * kThreads + threadIdx.x;
  int64_t r = 0, v = first;
  if (ipr <= first) {  // then ipr < 2^31
    const unsigned int q = first / static_cast<unsigned int>(ipr);
    r = q;
    v = first - static_cast<int64_t>(q) * ipr;
  }
  const int64_t dr = p.step_rows;
  const int64_t dv = p.step_items;

  for (; r < p.rows;) {
    const int64_t c0 = v * V;
    const int n = static_cast<int>(std::min<int64_t>(V, p.cols - c0));

    scalar_t xp[V], xt[V], xv[V], xr[V];
    load_items<scalar_t, V>(p.pred + r * p.pred_stride + c0, n, xp);
    load_items<scalar_t, V>(p.target + r * p.target_stride + c0, n, xt);
    if constexpr (kHasPrev) load_items<scalar_t, V>(p.prev + r * p.prev_stride + c0, n, xv);
    if constexpr (kHasRaw) load_items<scalar_t, V>(p.raw + r * p.raw_stride + c0, n, xr);
    acc_t m = acc_t(1);
    if constexpr (kHasPrev) {
      if (p.mask) m = p.mask[r];
    }
    const acc_t row_coef = temporal_row_scale * m;

    grad_t gp[V], gt[V], gr[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < n) {
        const acc_t pj = static_cast<acc_t>(xp[j]);
        const acc_t cw = p.colw[c0 + j];
        const acc_t d = pj - static_cast<acc_t>(xt[j]);
        const acc_t gd =
            difference_gradient(d, difference_coefficient(cw, k.mse, k.perceptual), k.l1);
        acc_t g = gd;
        gt[j] = static_cast<grad_t>(-gd);
        if constexpr (kHasPrev) {
          const acc_t e = pj - static_cast<acc_t>(xv[j]);
          if (temporal_grad) g = g + temporal_gradient(e, row_coef);
          accumulate_temporal(acc, e);
        }
        if constexpr (kHasRaw) {
          const acc_t s = pj - static_cast<acc_t>(xr[j]);
          const acc_t gs = smoothing_gradient(s, k.smoothing);
          g = g + gs;
          gr[j] = static_cast<grad_t>(-gs);
          accumulate_smoothing(acc, s);
        }
        gp[j] = static_cast<grad_t>(g);
        accumulate_difference(acc, d, cw);
      }
    }
    if constexpr (kHasPrev) {
      temporal = temporal + m * acc.temporal;
      acc.temporal = acc_t(0);
    }

    const int64_t out = r * p.cols + c0;
    if (p.grad_pred) store_items<grad_t, V>(p.grad_pred + out, n, gp);
    if (p.grad_target) store_items<grad_t, V>(p.grad_target + out, n, gt);
    if constexpr (kHasRaw) {
      if (p.grad_raw) store_items<grad_t, V>(p.grad_raw + out, n, gr);
    }

    r += dr;
    v += dv;
    if (v >= ipr) {
      v -= ipr;
      ++r;
    }
  }

  double sums[kNumTerms];
  sums[kMse] = static_cast<double>(acc.sq);
  sums[kL1] = static_cast<double>(acc.abs);
  sums[kPerceptual] = static_cast<double>(acc.perceptual);
  sums[kTemporal] = static_cast<double>(temporal);
  sums[kSmoothing] = static_cast<double>(acc.smoothing);
  auto* counter = reinterpret_cast<unsigned int*>(p.workspace + kCounterSlot);
  if (grid_sum<kNumTerms>(sums, p.workspace + kPartialsSlot, counter) && threadIdx.x == 0) {
    double w[kNumTerms];  // read again: not kept in registers through the loop
    load_weights(p, w);
    finish_terms<double, acc_t>(sums, w, p.rows, p.cols, mask_sum(p), kHasPrev, kHasRaw, p.terms,
                                p.total);
  }
}

// ---------------------------------------------------------------------------
// Backward: out = saved * grad_output, all three tensors in one launch
// (blockIdx.y picks the tensor); grad_output is read on the device. In place
// (scale_gradients_), out is saved.

enum GradOutputKind : int { kGoFloat = 0, kGoDouble = 1, kGoHalf = 2, kGoBFloat16 = 3 };

template <typename acc_t>
__device__ __forceinline__ acc_t read_grad_output(const void* ptr, int kind) {
  switch (kind) {  // as grad_output.to(acc_t) on the CPU
    case kGoDouble: return static_cast<acc_t>(*static_cast<const double*>(ptr));
    case kGoHalf: return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::Half*>(ptr)));
    case kGoBFloat16:
      return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::BFloat16*>(ptr)));
    default: return static_cast<acc_t>(*static_cast<const float*>(ptr));
  }
}

template <typename src_t, typename dst_t>
struct ScaleParams {
  const src_t* src0;  // nullptr: nothing to do for this tensor
  const src_t* src1;
  const src_t* src2;
  dst_t* dst0;
  dst_t* dst1;
  dst_t* dst2;
  int64_t numel0, numel1, numel2;
  const void* grad_output;
  int grad_output_kind;
  bool unit_is_noop;  // in place (src == dst): a grad_output of 1 writes nothing
};

template <typename src_t, typename dst_t, int V>
__global__ void __launch_bounds__(kThreads) scale_kernel(const ScaleParams<src_t, dst_t> p) {
  using acc_t = at::opmath_type<dst_t>;
  const int which = blockIdx.y;  // no dynamic indexing into the parameter struct
  const src_t* src = which == 0 ? p.src0 : which == 1 ? p.src1 : p.src2;
  dst_t* dst = which == 0 ? p.dst0 : which == 1 ? p.dst1 : p.dst2;
  const int64_t n = which == 0 ? p.numel0 : which == 1 ? p.numel1 : p.numel2;
  if (src == nullptr) return;
  const acc_t go = read_grad_output<acc_t>(p.grad_output, p.grad_output_kind);
  if (p.unit_is_noop && go == acc_t(1)) return;  // decided on the device: no host sync

  const int64_t vectors = n / V;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < vectors; i += step) {
    src_t a[V];
    dst_t b[V];
    load_vec<src_t, V>(src + i * V, a);
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = static_cast<dst_t>(static_cast<acc_t>(a[j]) * go);
    store_vec<dst_t, V>(dst + i * V, b);
  }
  if (blockIdx.x == 0) {  // the last n % V (< V <= kThreads) elements
    const int64_t i = vectors * V + threadIdx.x;
    if (i < n) dst[i] = static_cast<dst_t>(static_cast<acc_t>(src[i]) * go);
  }
}

// ---------------------------------------------------------------------------
// Host side.

int multiprocessors() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_for_device(cache, [](int dev) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
  });
}

// Blocks of kThreads that the hardware can hold at once: caps the grids of
// the small kernels, and bounds every forward grid (workspace size).
int max_resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_for_device(cache, [](int dev) {
    int threads = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
    return multiprocessors() * std::max(1, threads / kThreads);
  });
}

// Forward blocks resident at once, from the kernel's registers: the forward
// grid is capped there, so every block starts in the first wave.
template <typename scalar_t, typename grad_t, int V, bool kHasPrev, bool kHasRaw>
int forward_resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_for_device(cache, [](int) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, forward_kernel<scalar_t, grad_t, V, kHasPrev, kHasRaw>, kThreads, 0));
    return std::min(max_resident_blocks(), multiprocessors() * std::max(1, per_sm));
  });
}


template <typename scalar_t, typename grad_t, int V, bool kHasPrev, bool kHasRaw>
void launch_forward_kernel(ForwardParams<scalar_t, grad_t> p, cudaStream_t stream) {
  p.items_per_row = ceil_div(p.cols, V);
  const int grid = static_cast<int>(std::min<int64_t>(
      ceil_div(p.rows * p.items_per_row, kThreads),
      forward_resident_blocks<scalar_t, grad_t, V, kHasPrev, kHasRaw>()));
  const int64_t step = static_cast<int64_t>(grid) * kThreads;
  p.step_rows = step / p.items_per_row;
  p.step_items = step % p.items_per_row;
  forward_kernel<scalar_t, grad_t, V, kHasPrev, kHasRaw><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename grad_t, int V>
void launch_forward_v(const ForwardParams<scalar_t, grad_t>& p, bool has_prev, bool has_raw,
                      cudaStream_t stream) {
  if (has_prev && has_raw) {
    launch_forward_kernel<scalar_t, grad_t, V, true, true>(p, stream);
  } else if (has_prev) {
    launch_forward_kernel<scalar_t, grad_t, V, true, false>(p, stream);
  } else if (has_raw) {
    launch_forward_kernel<scalar_t, grad_t, V, false, true>(p, stream);
  } else {
    launch_forward_kernel<scalar_t, grad_t, V, false, false>(p, stream);
  }
}

// Forward blocks at most, for the workspace size: any V, any occupancy.
int64_t forward_grid_bound(int64_t rows, int64_t cols) {
  return std::min<int64_t>(ceil_div(rows * cols, kThreads), max_resident_blocks());
}

template <typename scalar_t, typename grad_t>
bool forward_vectorizable(const ForwardParams<scalar_t, grad_t>& p, int v) {
  const int64_t es = sizeof(scalar_t), gs = sizeof(grad_t);
  return rows_aligned(p.pred, p.pred_stride, p.rows, es, v) &&
         rows_aligned(p.target, p.target_stride, p.rows, es, v) &&
         rows_aligned(p.prev, p.prev_stride, p.rows, es, v) &&
         rows_aligned(p.raw, p.raw_stride, p.rows, es, v) &&
         rows_aligned(p.grad_pred, p.cols, p.rows, gs, v) &&
         rows_aligned(p.grad_target, p.cols, p.rows, gs, v) &&
         rows_aligned(p.grad_raw, p.cols, p.rows, gs, v);
}

// 16-byte vectors where every operand allows them, else 8-byte, else scalars.
template <typename scalar_t, typename grad_t>
void launch_forward(const ForwardParams<scalar_t, grad_t>& p, bool has_prev, bool has_raw,
                    cudaStream_t stream) {
  constexpr int kV16 = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kV16 >= 2) {
    if (forward_vectorizable(p, kV16)) {
      return launch_forward_v<scalar_t, grad_t, kV16>(p, has_prev, has_raw, stream);
    }
  }
  if constexpr (kV16 >= 4) {
    if (forward_vectorizable(p, kV16 / 2)) {
      return launch_forward_v<scalar_t, grad_t, kV16 / 2>(p, has_prev, has_raw, stream);
    }
  }
  launch_forward_v<scalar_t, grad_t, 1>(p, has_prev, has_raw, stream);
}

template <typename acc_t, typename mask_t>
void launch_mask_sum(const at::Tensor& mask, int64_t rows, acc_t* converted, double* workspace,
                     int grid, cudaStream_t stream) {
  mask_sum_kernel<acc_t, mask_t>
      <<<grid, kThreads, 0, stream>>>(mask.const_data_ptr<mask_t>(), rows, converted, workspace);
}

// The mask pre-kernel for a mask of another dtype than acc_t, one of
// KF_FOR_EACH_DIRECT_MASK_DTYPE (bool, integers, the other floating types),
// which it converts into `converted`.
template <typename acc_t>
void launch_converting_mask_sum(const at::Tensor& mask, int64_t rows, acc_t* converted,
                                double* workspace, int grid, cudaStream_t stream) {
  switch (mask.scalar_type()) {
#define KF_CASE(ctype, name)                                                          \
  case at::ScalarType::name:                                                          \
    return launch_mask_sum<acc_t, ctype>(mask, rows, converted, workspace, grid, stream);
    KF_FOR_EACH_DIRECT_MASK_DTYPE(KF_CASE)
#undef KF_CASE
    default:  // prepare_inputs converts every other dtype
      TORCH_CHECK(false, "koemorph_fused (CUDA): unexpected continuity dtype ", mask.scalar_type());
  }
}


template <typename scalar_t>
void run_forward(const LossInputs& in, ForwardOutputs& outs, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  using grad_t = grad_storage_t<scalar_t>;
  auto& [total, terms, grad_pred, grad_target, grad_raw] = outs;
  for (const at::Tensor* g : {&grad_pred, &grad_target, &grad_raw}) {
    TORCH_CHECK(g->numel() == 0 || g->scalar_type() == c10::CppTypeToScalarType<grad_t>::value,
                "koemorph_fused (CUDA): gradient buffers must be ",
                c10::CppTypeToScalarType<grad_t>::value, ", got ", g->scalar_type());
  }

  ForwardParams<scalar_t, grad_t> p{};
  p.pred = in.pred.const_data_ptr<scalar_t>();
  p.target = in.target.const_data_ptr<scalar_t>();
  p.prev = in.prev.defined() ? in.prev.const_data_ptr<scalar_t>() : nullptr;
  p.raw = in.raw.defined() ? in.raw.const_data_ptr<scalar_t>() : nullptr;
  p.pred_stride = in.pred.stride(0);
  p.target_stride = in.target.stride(0);
  p.prev_stride = in.prev.defined() ? in.prev.stride(0) : 0;
  p.raw_stride = in.raw.defined() ? in.raw.stride(0) : 0;
  // Only the temporal term reads the mask (prepare_inputs keeps it only
  // then). One of another dtype is converted into the workspace below.
  const bool with_mask = in.mask.defined() && in.prev.defined();
  const bool convert_mask = with_mask && in.mask.scalar_type() != c10::CppTypeToScalarType<acc_t>::value;
  p.mask = with_mask && !convert_mask ? in.mask.const_data_ptr<acc_t>() : nullptr;
  p.colw = in.column_weights.const_data_ptr<acc_t>();
  p.grad_pred = data_or_null<grad_t>(grad_pred);
  p.grad_target = data_or_null<grad_t>(grad_target);
  p.grad_raw = data_or_null<grad_t>(grad_raw);
  p.rows = in.rows;
  p.cols = in.cols;
  for (int i = 0; i < kNumTerms; ++i) p.weights[i] = in.weights[i];
  p.weights_dev = in.weights_on_host ? nullptr : in.weight_tensor.const_data_ptr<double>();
  p.terms = terms.mutable_data_ptr<acc_t>();
  p.total = total.mutable_data_ptr<acc_t>();

  const bool has_prev = p.prev != nullptr, has_raw = p.raw != nullptr;
  const int mask_grid = static_cast<int>(
      std::min<int64_t>(ceil_div(in.rows, kThreads * 16), max_resident_blocks()));
  const int64_t partials =
      std::max<int64_t>(forward_grid_bound(in.rows, in.cols) * kNumTerms, with_mask ? mask_grid : 0);
  // 8-byte slots; a converted mask takes the slots after the partials.
  const int64_t mask_slots = convert_mask ? ceil_div(in.rows * int64_t(sizeof(acc_t)), int64_t(8)) : 0;
  const at::Tensor workspace =
      at::empty({kPartialsSlot + partials + mask_slots}, in.pred.options().dtype(at::kDouble));
  p.workspace = workspace.mutable_data_ptr<double>();
  C10_CUDA_CHECK(cudaMemsetAsync(p.workspace + kCounterSlot, 0, sizeof(double), stream));

  if (with_mask) {
    acc_t* converted =
        convert_mask ? reinterpret_cast<acc_t*>(p.workspace + kPartialsSlot + partials) : nullptr;
    if (convert_mask) {
      launch_converting_mask_sum<acc_t>(in.mask, in.rows, converted, p.workspace, mask_grid, stream);
      p.mask = converted;
    } else {
      mask_sum_kernel<acc_t, acc_t><<<mask_grid, kThreads, 0, stream>>>(p.mask, in.rows, nullptr,
                                                                        p.workspace);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_forward<scalar_t, grad_t>(p, has_prev, has_raw, stream);
}

ForwardOutputs temporal_loss_forward_cuda(const at::Tensor& pred, const at::Tensor& target,
                                          const std::optional<at::Tensor>& prev,
                                          const std::optional<at::Tensor>& raw,
                                          const std::optional<at::Tensor>& continuity,
                                          const at::Tensor& column_weights,
                                          const at::Tensor& weights, bool grad_pred,
                                          bool grad_target, bool grad_raw) {
  TORCH_CHECK_VALUE(pred.is_cuda(), "pred must be a CUDA tensor here, got ", pred.device());
  const c10::cuda::CUDAGuard guard(pred.device());
  const LossInputs in = prepare_inputs(pred, target, prev, raw, continuity, column_weights, weights,
                                       grad_pred, grad_target, grad_raw);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ForwardOutputs outs = allocate_outputs(in, pred);
  switch (in.pred.scalar_type()) {
    case at::kFloat: run_forward<float>(in, outs, stream); break;
    case at::kDouble: run_forward<double>(in, outs, stream); break;
    case at::kHalf: run_forward<c10::Half>(in, outs, stream); break;
    case at::kBFloat16: run_forward<c10::BFloat16>(in, outs, stream); break;
    default: TORCH_CHECK_TYPE(false, "koemorph_fused (CUDA): unsupported dtype ", in.pred.scalar_type());
  }
  return outs;
}

int grad_output_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kGoFloat;
    case at::kDouble: return kGoDouble;
    case at::kHalf: return kGoHalf;
    case at::kBFloat16: return kGoBFloat16;
    default: TORCH_CHECK_TYPE(false, "grad_output must be float16, bfloat16, float32 or float64, got ", t);
  }
  return kGoFloat;  // not reached
}

template <typename src_t, typename dst_t, int V>
void launch_scale_v(const ScaleParams<src_t, dst_t>& p, int64_t max_numel, cudaStream_t stream) {
  const int64_t vectors = std::max<int64_t>(1, max_numel / V);
  const dim3 grid(static_cast<unsigned int>(
                      std::min<int64_t>(ceil_div(vectors, kThreads), max_resident_blocks())),
                  3);
  scale_kernel<src_t, dst_t, V><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename src_t, typename dst_t>
void run_scale(ScaleParams<src_t, dst_t> p, cudaStream_t stream) {
  constexpr int kV = static_cast<int>(16 / std::max(sizeof(src_t), sizeof(dst_t)));
  const int64_t max_numel = std::max({p.numel0, p.numel1, p.numel2});
  bool aligned = true;
  for (const void* ptr : {static_cast<const void*>(p.src0), static_cast<const void*>(p.src1),
                          static_cast<const void*>(p.src2)}) {
    aligned = aligned && rows_aligned(ptr, 0, 1, sizeof(src_t), kV);
  }
  for (const void* ptr : {static_cast<const void*>(p.dst0), static_cast<const void*>(p.dst1),
                          static_cast<const void*>(p.dst2)}) {
    aligned = aligned && rows_aligned(ptr, 0, 1, sizeof(dst_t), kV);
  }
  if (aligned) launch_scale_v<src_t, dst_t, kV>(p, max_numel, stream);
  else launch_scale_v<src_t, dst_t, 1>(p, max_numel, stream);
}

template <typename scalar_t>
void run_scale_typed(const at::Tensor& grad_output, const at::Tensor* saved, at::Tensor* out,
                     cudaStream_t stream) {
  using src_t = grad_storage_t<scalar_t>;
  ScaleParams<src_t, scalar_t> p{};
  const src_t** src[3] = {&p.src0, &p.src1, &p.src2};
  scalar_t** dst[3] = {&p.dst0, &p.dst1, &p.dst2};
  int64_t* numel[3] = {&p.numel0, &p.numel1, &p.numel2};
  for (int i = 0; i < 3; ++i) {
    *src[i] = data_or_null<const src_t>(saved[i]);
    *dst[i] = data_or_null<scalar_t>(out[i]);
    *numel[i] = saved[i].numel();
  }
  p.grad_output = grad_output.const_data_ptr();
  p.grad_output_kind = grad_output_kind(grad_output.scalar_type());
  run_scale<src_t, scalar_t>(p, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_gradients_cuda(const at::Tensor& grad_output,
                                                                     const at::Tensor& grad_pred,
                                                                     const at::Tensor& grad_target,
                                                                     const at::Tensor& grad_raw,
                                                                     at::ScalarType dtype) {
  check_scale_gradients(grad_output, {grad_pred, grad_target, grad_raw}, dtype);
  const at::Tensor saved[3] = {grad_pred, grad_target, grad_raw};
  at::Tensor out[3];
  const at::Tensor* first = nullptr;
  for (int i = 0; i < 3; ++i) {
    if (saved[i].numel() == 0) {
      out[i] = at::empty({0}, saved[i].options().dtype(dtype));
    } else {
      out[i] = at::empty(saved[i].sizes(), saved[i].options().dtype(dtype));
      if (first == nullptr) first = &saved[i];
    }
  }
  if (first == nullptr) return {out[0], out[1], out[2]};  // nothing to scale, no launch

  TORCH_CHECK_VALUE(grad_output.is_cuda(), "grad_output must be on the device of the saved gradients");
  const c10::cuda::CUDAGuard guard(first->device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: run_scale_typed<float>(grad_output, saved, out, stream); break;
    case at::kDouble: run_scale_typed<double>(grad_output, saved, out, stream); break;
    case at::kHalf: run_scale_typed<c10::Half>(grad_output, saved, out, stream); break;
    case at::kBFloat16: run_scale_typed<c10::BFloat16>(grad_output, saved, out, stream); break;
    default: TORCH_CHECK_TYPE(false, "koemorph_fused (CUDA): unsupported dtype ", dtype);
  }
  return {out[0], out[1], out[2]};
}

// In place, three tensors per launch (src == dst: each element is read by the
// thread that writes it). The launch happens even for a grad_output of 1,
// which only the device knows; then every block returns after one read.
template <typename scalar_t>
void run_scale_in_place_typed(const at::Tensor& grad_output, at::TensorList grads,
                              cudaStream_t stream) {
  ScaleParams<scalar_t, scalar_t> p{};
  const scalar_t** src[3] = {&p.src0, &p.src1, &p.src2};
  scalar_t** dst[3] = {&p.dst0, &p.dst1, &p.dst2};
  int64_t* numel[3] = {&p.numel0, &p.numel1, &p.numel2};
  p.grad_output = grad_output.const_data_ptr();
  p.grad_output_kind = grad_output_kind(grad_output.scalar_type());
  p.unit_is_noop = true;
  int n = 0;
  auto run = [&] {
    run_scale<scalar_t, scalar_t>(p, stream);
    for (int i = 0; i < 3; ++i) *src[i] = nullptr, *dst[i] = nullptr, *numel[i] = 0;
    n = 0;
  };
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    *dst[n] = static_cast<scalar_t*>(g.mutable_data_ptr());
    *src[n] = *dst[n];
    *numel[n] = g.numel();
    if (++n == 3) run();
  }
  if (n > 0) run();
}

void scale_gradients_in_place_cuda(const at::Tensor& grad_output, at::TensorList grads) {
  const std::optional<at::ScalarType> dtype = check_scale_gradients_in_place(grad_output, grads);
  if (!dtype) return;  // nothing to scale, no launch
  TORCH_CHECK_VALUE(grad_output.is_cuda(), "grad_output must be on the device of grads");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (*dtype) {
    case at::kFloat: run_scale_in_place_typed<float>(grad_output, grads, stream); break;
    case at::kDouble: run_scale_in_place_typed<double>(grad_output, grads, stream); break;
    case at::kHalf: run_scale_in_place_typed<c10::Half>(grad_output, grads, stream); break;
    case at::kBFloat16: run_scale_in_place_typed<c10::BFloat16>(grad_output, grads, stream); break;
    default: TORCH_CHECK_TYPE(false, "koemorph_fused (CUDA): unsupported dtype ", *dtype);
  }
}

}  // namespace gpu

TORCH_LIBRARY_IMPL(koemorph_fused, CUDA, m) {
  m.impl("temporal_loss_forward", &gpu::temporal_loss_forward_cuda);
  m.impl("scale_gradients", &gpu::scale_gradients_cuda);
  m.impl("scale_gradients_", &gpu::scale_gradients_in_place_cuda);
}

}  // namespace koemorph_fused
