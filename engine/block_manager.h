// Hands out KV-cache blocks to sequences: a free list plus a reference count per block, so that
// the samples of one prompt can share the blocks of its prefill. Plain C++, no device in sight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace dilu {

class BlockManager {
 public:
  explicit BlockManager(int64_t num_blocks);
  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used() const { return num_blocks() - num_free(); }
  bool can_allocate(int64_t n) const { return n <= num_free(); }
  // Appends n fresh blocks to `table`; the caller checks can_allocate first.
  void allocate(int64_t n, std::vector<int32_t>& table);
  // Drops the table's references; blocks nobody references any more return to the free list.
  void release(std::vector<int32_t>& table);
  // Adds a reference to every block of `table` (a fork shares them).
  void share(const std::vector<int32_t>& table);
  int32_t ref_count(int32_t block) const { return ref_[static_cast<size_t>(block)]; }

 private:
  std::vector<int32_t> ref_;   // [num_blocks] references per block
  std::vector<int32_t> free_;  // stack; lowest ids handed out first
};

}  // namespace dilu
