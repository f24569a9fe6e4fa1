// The paged latent KV cache: per layer, blocks of `block_size` tokens, each token holding MLA's
// normalized latent (kv_lora_rank) and rotated key (qk_rope_head_dim). The block manager that
// hands out blocks is plain C++; the block storage lives on the backend's device.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace dilu {

class BlockManager {
 public:
  explicit BlockManager(int64_t num_blocks);
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  bool can_allocate(int64_t n) const { return n <= num_free(); }
  // Appends n blocks to `table`; the caller checks can_allocate first.
  void allocate(int64_t n, std::vector<int32_t>& table);
  void release(std::vector<int32_t>& table);

 private:
  int64_t num_blocks_;
  std::vector<int32_t> free_;  // stack; lowest ids handed out first
};

class KvCache {
 public:
  KvCache(Ops& ops, int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t entry_width);
  Tensor& layer(int64_t l) { return layers_[static_cast<size_t>(l)]; }  // [num_blocks, block_size, C + R]
  int64_t block_size() const { return block_size_; }
  BlockManager& blocks() { return blocks_; }
  // Blocks needed to hold `tokens` tokens.
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

 private:
  int64_t block_size_;
  std::vector<Tensor> layers_;
  BlockManager blocks_;
};

}  // namespace dilu
