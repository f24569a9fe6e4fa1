// Paged latent cache storage and its block manager.
#include "engine/kv_cache.h"

#include <algorithm>

namespace dilu {

BlockManager::BlockManager(int64_t num_blocks) : num_blocks_(num_blocks) {
  DILU_CHECK(num_blocks >= 0, "negative block count");
  free_.resize(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) free_[static_cast<size_t>(i)] = static_cast<int32_t>(num_blocks - 1 - i);
}

void BlockManager::allocate(int64_t n, std::vector<int32_t>& table) {
  DILU_CHECK(can_allocate(n), "allocating ", n, " blocks with ", num_free(), " free");
  for (int64_t i = 0; i < n; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
}

void BlockManager::release(std::vector<int32_t>& table) {
  for (auto it = table.rbegin(); it != table.rend(); ++it) free_.push_back(*it);
  table.clear();
}

KvCache::KvCache(Ops& ops, int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t entry_width)
    : block_size_(block_size), blocks_(num_blocks) {
  DILU_CHECK(block_size > 0, "block size must be positive");
  for (int64_t l = 0; l < num_layers; ++l)
    layers_.push_back(ops.empty(ops.activation_dtype(), {num_blocks, block_size, entry_width}));
}

}  // namespace dilu
