// See block_manager.h.
#include "engine/block_manager.h"

#include "kernels/error.h"

namespace dilu {

BlockManager::BlockManager(int64_t num_blocks) {
  DILU_CHECK(num_blocks >= 0, "negative block count");
  ref_.assign(static_cast<size_t>(num_blocks), 0);
  free_.resize(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) free_[static_cast<size_t>(i)] = static_cast<int32_t>(num_blocks - 1 - i);
}

void BlockManager::allocate(int64_t n, std::vector<int32_t>& table) {
  DILU_CHECK(can_allocate(n), "allocating ", n, " blocks with ", num_free(), " free");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    ref_[static_cast<size_t>(b)] = 1;
    table.push_back(b);
  }
}

void BlockManager::release(std::vector<int32_t>& table) {
  for (auto it = table.rbegin(); it != table.rend(); ++it) {
    int32_t& r = ref_[static_cast<size_t>(*it)];
    DILU_CHECK(r > 0, "releasing free block ", *it);
    if (--r == 0) free_.push_back(*it);
  }
  table.clear();
}

void BlockManager::share(const std::vector<int32_t>& table) {
  for (int32_t b : table) {
    DILU_CHECK(ref_[static_cast<size_t>(b)] > 0, "sharing free block ", b);
    ++ref_[static_cast<size_t>(b)];
  }
}

}  // namespace dilu
