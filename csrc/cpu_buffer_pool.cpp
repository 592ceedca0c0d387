#include "cpu_buffer_pool.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace koemorph_fused {
namespace {

// Each block starts with a header holding its size; the data follows at a
// 64-byte offset, so the data keeps the alignment torch's allocator gives.
constexpr size_t kHeader = 64;
constexpr size_t kHugePage = size_t(2) << 20;

int64_t limit_from_env() {
  const char* mb = std::getenv("KOEMORPH_FUSED_CPU_CACHE_MB");
  if (mb != nullptr && *mb != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(mb, &end, 10);
    if (end != mb && v >= 0) return static_cast<int64_t>(v) << 20;
  }
  return int64_t(2048) << 20;
}

class GradientBufferPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t total = nbytes + kHeader;
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(total);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(total);
        ++hits_;
      } else {
        ++misses_;
      }
      in_use_ += static_cast<int64_t>(total);
    }
    if (base == nullptr) base = allocate_block(total);
    return {static_cast<char*>(base) + kHeader, base, &GradientBufferPool::release,
            c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  BufferPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_, limit_, hits_, misses_};
  }

  void empty_cache() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [size, list] : blocks) {
      for (void* p : list) std::free(p);
    }
  }

  static GradientBufferPool& instance() {
    static GradientBufferPool* pool = new GradientBufferPool();  // never destroyed: tensors may outlive exit handlers
    return *pool;
  }

 private:
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
    size_t total = 0;
    std::memcpy(&total, base, sizeof(total));
    GradientBufferPool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.in_use_ -= static_cast<int64_t>(total);
      if (pool.cached_ + static_cast<int64_t>(total) <= pool.limit_) {
        pool.free_[total].push_back(base);
        pool.cached_ += static_cast<int64_t>(total);
        return;
      }
    }
    std::free(base);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0;
  int64_t in_use_ = 0;
  const int64_t limit_ = limit_from_env();
  int64_t hits_ = 0;
  int64_t misses_ = 0;
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
