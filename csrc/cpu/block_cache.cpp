// BlockCache (block_cache.h): torch's CPU allocator for the length of a hot call, keeping large freed blocks by
// their size for the next request of that size or of at least half of it. Measured on convnet.py's conv4
// meta-step (16 tasks, 2 threads, this project's 2-core AMD EPYC): through glibc, 7 600-10 400 fresh pages faulted
// in a step (its trimming and mmap threshold hand freed feature maps back to the system) and 52.7-57.5 ms a step;
// from the cache, no page fault and 43.5-45.1 ms.
#include "block_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace metalearn_fast {
namespace {

constexpr int64_t kMaxCachedBytes = int64_t(1) << 30;  // beyond this, freed blocks go back to the system

class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may be freed during the exit
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < kBlockCacheMinBytes) return previous_.load()->allocate(n);
    void* block = nullptr;
    size_t size = n;
    {
      // the smallest kept block of n bytes or more, if at most twice that (a meta-batch's last, smaller chunk
      // takes the blocks of the full ones)
      std::lock_guard<std::mutex> lock(blocks_mutex_);
      const auto found = free_.lower_bound(n);
      if (found != free_.end() && found->first <= 2 * n) {
        size = found->first;
        block = found->second.back();
        found->second.pop_back();
        if (found->second.empty()) free_.erase(found);
        cached_bytes_ -= static_cast<int64_t>(size);
      }
    }
    const bool fresh = block == nullptr;
    if (fresh) block = c10::alloc_cpu(n);
    {
      std::lock_guard<std::mutex> lock(blocks_mutex_);
      block_[block] = {size, window_.load()};  // (over an entry that free_raw never saw: see there)
      system_blocks_ += fresh;
    }
    return {block, block, &BlockCache::keep_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Raw allocations (oneDNN's scratch memory, through ideep) are freed by the raw_deleter that torch's CPU
  // allocator has when they are freed, so free_raw may get a block of the allocator this cache replaced.
  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::free_raw; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(swap_mutex_);
    if (depth_++ > 0) return;
    // (set first: a small request may come as soon as the swap is done; never this cache, which hands small
    // requests to previous_)
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != this) previous_ = current;
    ++window_;
    // priority 0, torch's default allocator's: an allocator someone installed with a priority stays
    c10::SetCPUAllocator(this, 0);
    swapped_ = c10::GetCPUAllocator() == this;
  }

  void exit() {
    std::lock_guard<std::mutex> lock(swap_mutex_);
    if (--depth_ > 0) return;
    if (swapped_) c10::SetCPUAllocator(previous_.load(), 0);
    swapped_ = false;
    ++window_;  // (a raw block of the window just closed is not kept: see free_raw)
  }

  int64_t release() {
    std::vector<void*> blocks;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(blocks_mutex_);
      for (auto& [size, list] : free_) {
        for (void* block : list) {
          blocks.push_back(block);
          block_.erase(block);
          bytes += static_cast<int64_t>(size);
        }
      }
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* block : blocks) c10::free_cpu(block);
    return bytes;
  }

  BlockCacheStats stats() {
    std::lock_guard<std::mutex> swap_lock(swap_mutex_);
    std::lock_guard<std::mutex> lock(blocks_mutex_);
    return {cached_bytes_, system_blocks_, swapped_};
  }

 private:
  struct Block {
    size_t size;
    uint64_t window;  // the window (enter to exit) of its last allocation
  };

  // Keeps a block of this cache for reuse (up to kMaxCachedBytes), else frees it.
  void keep(void* block, bool raw) {
    {
      std::lock_guard<std::mutex> lock(blocks_mutex_);
      const auto found = block_.find(block);
      if (found != block_.end()) {
        const size_t size = found->second.size;
        // see free_raw for the window
        if ((!raw || found->second.window == window_.load()) && cached_bytes_ + static_cast<int64_t>(size) <=
                                                                    kMaxCachedBytes) {
          free_[size].push_back(block);
          cached_bytes_ += static_cast<int64_t>(size);
          return;
        }
        block_.erase(found);
      }
    }
    c10::free_cpu(block);
  }

  // The deleter of the tensors' blocks (a DataPtr keeps its deleter): always a block of this cache.
  static void keep_block(void* block) { instance().keep(block, false); }

  // A raw block of this cache, or of the allocator it replaced (both come from c10::alloc_cpu, so free_cpu frees
  // either). A raw block of this cache that is freed after its window closed goes to the other allocator's
  // deleter and leaves its entry behind: if the address comes back here from the other allocator, the entry's
  // window is an old one, and the block is freed, not kept (a block comes back within its own window only from
  // this cache, as the other allocator's deleter is not torch's raw_deleter then).
  static void free_raw(void* block) { instance().keep(block, true); }

  std::mutex swap_mutex_;  // depth_, swapped_ and the swaps
  int depth_ = 0;
  bool swapped_ = false;
  std::atomic<c10::Allocator*> previous_{nullptr};

  std::atomic<uint64_t> window_{0};  // odd while the cache is torch's allocator

  std::mutex blocks_mutex_;  // the maps and counts below
  std::unordered_map<void*, Block> block_;  // every block taken from the system and not returned
  std::map<size_t, std::vector<void*>> free_;  // kept blocks by size
  int64_t cached_bytes_ = 0;
  int64_t system_blocks_ = 0;
};

}  // namespace

void block_cache_enter() { BlockCache::instance().enter(); }
void block_cache_exit() { BlockCache::instance().exit(); }
int64_t block_cache_release() { return BlockCache::instance().release(); }
BlockCacheStats block_cache_stats() { return BlockCache::instance().stats(); }

}  // namespace metalearn_fast
