// A cache of large CPU gradient buffers, reused from one training step to the next.
//
// Why: glibc hands big blocks back to the OS when they are freed (munmap, or
// trimming the top of the heap), so every step would page-fault its fresh
// gradient buffers in again. Measured here at B = 1024 x 52 that was most of
// the step; at B = 262144 it cost more than the loss itself. Buffers from this
// pool go back to a per-size free list instead and come back warm.
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
  int64_t cached_bytes;     // idle, kept for reuse
  int64_t in_use_bytes;     // held by live tensors
  int64_t limit_bytes;      // most idle bytes kept (KOEMORPH_FUSED_CPU_CACHE_MB)
  int64_t hits;             // allocations served from the cache
  int64_t misses;           // allocations that went to the system
};

BufferPoolStats buffer_pool_stats();

// Frees every idle buffer (like torch.cuda.empty_cache for this pool).
void buffer_pool_empty_cache();

}  // namespace koemorph_fused
