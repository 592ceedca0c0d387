#include "cpu_buffer_pool.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace koemorph_fused {
namespace {

// Each block starts with a header holding its capacity; the data follows at
// a 64-byte offset, so the data keeps the alignment torch's allocator gives.
constexpr size_t kHeader = 64;
constexpr size_t kHugePage = size_t(2) << 20;

int64_t cap_from_env() {
  const char* mb = std::getenv("KOEMORPH_FUSED_CPU_CACHE_MB");
  if (mb != nullptr && *mb != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(mb, &end, 10);
    if (end != mb && v >= 0) return static_cast<int64_t>(v) << 20;
  }
  return int64_t(2048) << 20;
}

// Blocks come in size classes, four per power of two (at most 25% above the
// request), so that nearby batch sizes share blocks.
size_t size_class(size_t bytes) {
  const int log2 = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));
  const size_t step = size_t(1) << std::max(log2 - 2, 0);
  return (bytes + step - 1) / step * step;
}

// A block serves a request of `need` bytes if it holds at most twice that:
// reuse across batch sizes that change from step to step, without parking a
// large block under a small tensor.
bool fits(size_t capacity, size_t need) { return capacity >= need && capacity / 2 <= need; }

class GradientBufferPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t need = nbytes + kHeader;
    void* base = nullptr;
    size_t capacity = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit among the idle blocks (a handful: the pool keeps at most
      // twice the peak bytes in use).
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (fits(it->capacity, need) && (best == idle_.end() || it->capacity < best->capacity)) best = it;
      }
      if (best != idle_.end()) {
        base = best->base;
        capacity = best->capacity;
        idle_.erase(best);
        cached_ -= static_cast<int64_t>(capacity);
        ++hits_;
      } else {
        capacity = size_class(need);
        ++misses_;
      }
      in_use_ += static_cast<int64_t>(capacity);
      peak_in_use_ = std::max(peak_in_use_, in_use_);
    }
    if (base == nullptr) base = allocate_block(capacity);
    return {static_cast<char*>(base) + kHeader, base, &GradientBufferPool::release,
            c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  BufferPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_, peak_in_use_, limit_locked(), cap_, hits_, misses_, evictions_};
  }

  void empty_cache() {
    std::vector<Idle> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(idle_);
      cached_ = 0;
      peak_in_use_ = in_use_;  // the bound starts again from what is in use now
    }
    for (const Idle& b : blocks) std::free(b.base);
  }

  static GradientBufferPool& instance() {
    static GradientBufferPool* pool = new GradientBufferPool();  // never destroyed: tensors may outlive exit handlers
    return *pool;
  }

 private:
  struct Idle {
    void* base;
    size_t capacity;
  };

  // Idle bytes kept: at most twice the peak bytes in use at once (what the
  // loop actually needs, room for the blocks of two batch sizes), and at
  // most the cap (KOEMORPH_FUSED_CPU_CACHE_MB).
  int64_t limit_locked() const { return std::min(cap_, 2 * peak_in_use_); }

  static void* allocate_block(size_t total) {
    const size_t alignment = total >= kHugePage ? kHugePage : 64;
    void* base = nullptr;
    if (posix_memalign(&base, alignment, total) != 0) {
      TORCH_CHECK(false, "koemorph_fused: out of CPU memory allocating a gradient buffer of ", total,
                  " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Fewer, larger page faults the first time; harmless where THP is off.
    if (alignment == kHugePage) madvise(base, total - total % kHugePage, MADV_HUGEPAGE);
#endif
    std::memcpy(base, &total, sizeof(total));
    return base;
  }

  static void release(void* base) {
    size_t capacity = 0;
    std::memcpy(&capacity, base, sizeof(capacity));
    GradientBufferPool& pool = instance();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.in_use_ -= static_cast<int64_t>(capacity);
      pool.idle_.push_back({base, capacity});
      pool.cached_ += static_cast<int64_t>(capacity);
      // Over the limit: the blocks idle the longest go back to the system.
      const int64_t limit = pool.limit_locked();
      size_t n = 0;
      while (pool.cached_ > limit && n < pool.idle_.size()) {
        pool.cached_ -= static_cast<int64_t>(pool.idle_[n].capacity);
        evicted.push_back(pool.idle_[n].base);
        ++n;
      }
      pool.idle_.erase(pool.idle_.begin(), pool.idle_.begin() + static_cast<std::ptrdiff_t>(n));
      pool.evictions_ += static_cast<int64_t>(n);
    }
    for (void* p : evicted) std::free(p);
  }

  std::mutex mutex_;
  std::vector<Idle> idle_;  // oldest first
  int64_t cached_ = 0;
  int64_t in_use_ = 0;
  int64_t peak_in_use_ = 0;
  const int64_t cap_ = cap_from_env();
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t evictions_ = 0;
};

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (nbytes < kMinPooledBytes) {
    return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
  }
  return at::detail::empty_generic(sizes, &GradientBufferPool::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

BufferPoolStats buffer_pool_stats() { return GradientBufferPool::instance().stats(); }

void buffer_pool_empty_cache() { GradientBufferPool::instance().empty_cache(); }

}  // namespace koemorph_fused
