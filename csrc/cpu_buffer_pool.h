// A cache of large CPU gradient buffers, reused from one training step to the next.
//
// Why: glibc hands big blocks back to the OS when they are freed (munmap, or
// trimming the top of the heap), so every step would page-fault its fresh
// gradient buffers in again. Measured here at B = 1024 x 52 that was most of
// the step; at B = 262144 it cost more than the loss itself. Buffers from this
// pool go back to an idle list instead and come back warm.
//
// Blocks come in size classes (four per power of two) and a request takes
// the smallest idle block that is at most twice its size, so batch sizes
// that change from step to step still reuse blocks. Idle bytes are bounded by
// twice the peak bytes in use at once (and by KOEMORPH_FUSED_CPU_CACHE_MB,
// default 2048); over the bound, the blocks idle the longest are freed.
// Figures in docs/design.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace koemorph_fused {

// Buffers smaller than this come from torch's own allocator.
constexpr size_t kMinPooledBytes = 64 * 1024;

// A contiguous CPU tensor, without a trip through the dispatcher; large ones
// (gradients) come from the pool.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype);

struct BufferPoolStats {
  int64_t cached_bytes;       // idle, kept for reuse
  int64_t in_use_bytes;       // held by live tensors
  int64_t peak_in_use_bytes;  // most bytes in use at once (since start or empty_cache)
  int64_t limit_bytes;        // most idle bytes kept now: min(2 * peak in use, cap)
  int64_t cap_bytes;          // KOEMORPH_FUSED_CPU_CACHE_MB
  int64_t hits;               // allocations served from the cache
  int64_t misses;             // allocations that went to the system
  int64_t evictions;          // idle blocks freed to stay under the limit
};

BufferPoolStats buffer_pool_stats();

// Frees every idle buffer (like torch.cuda.empty_cache for this pool).
void buffer_pool_empty_cache();

}  // namespace koemorph_fused
