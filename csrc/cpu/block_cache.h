// Large CPU blocks kept for reuse across calls (BlockCache in block_cache.cpp): a hot path that allocates the
// same large tensors at every call (convnet.py's meta-step: its feature maps) takes them back from here instead
// of from glibc, which returns freed large blocks to the system and faults their pages in again at the next call.
#pragma once

#include <cstdint>

namespace metalearn_fast {

// Makes the cache torch's CPU allocator until the matching block_cache_exit (calls nest; the outermost pair
// swaps). Blocks of kBlockCacheMinBytes or more come from the cache, smaller ones from the allocator it replaced.
// Where another allocator than torch's default was installed with a priority, nothing changes. Thread-safe.
void block_cache_enter();
void block_cache_exit();

// Frees every kept block that no tensor holds (a block in use is kept when it is freed, as before); returns the
// bytes freed.
int64_t block_cache_release();

struct BlockCacheStats {
  int64_t cached_bytes;   // held for reuse, not in use
  int64_t system_blocks;  // blocks ever taken from the system
  bool active;            // the cache is torch's CPU allocator now
};
BlockCacheStats block_cache_stats();

constexpr int64_t kBlockCacheMinBytes = 64 << 10;

}  // namespace metalearn_fast
