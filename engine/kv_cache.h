// The paged latent KV cache: per layer, blocks of `block_size` tokens, each token holding MLA's
// normalized latent (kv_lora_rank) and rotated key (qk_rope_head_dim), on the backend's device.
// Which sequence owns which block is the BlockManager's business (block_manager.h).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace dilu {

class KvCache {
 public:
  KvCache(Ops& ops, int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t entry_width);
  Tensor& layer(int64_t l) { return layers_[static_cast<size_t>(l)]; }  // [num_blocks, block_size, C + R]
  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  // Copies whole blocks (every layer): dst[i] = src[i]. Used when a fork stops sharing a block.
  void copy_blocks(Ops& ops, const std::vector<std::pair<int32_t, int32_t>>& src_dst);

 private:
  int64_t block_size_;
  int64_t num_blocks_;
  std::vector<Tensor> layers_;
};

}  // namespace dilu
