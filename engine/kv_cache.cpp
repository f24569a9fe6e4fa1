// Paged latent cache storage.
#include "engine/kv_cache.h"

#include <algorithm>

namespace dilu {

KvCache::KvCache(Ops& ops, int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t entry_width)
    : block_size_(block_size), num_blocks_(num_blocks) {
  DILU_CHECK(block_size > 0, "block size must be positive");
  for (int64_t l = 0; l < num_layers; ++l)
    layers_.push_back(ops.allocate_persistent(ops.cache_dtype(), {num_blocks, block_size, entry_width}));
}

void KvCache::copy_blocks(Ops& ops, const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  for (Tensor& layer : layers_)
    for (auto [src, dst] : src_dst) {
      Tensor to = layer.rows(dst, dst + 1);
      ops.copy(layer.rows(src, src + 1), to);
    }
}

}  // namespace dilu
