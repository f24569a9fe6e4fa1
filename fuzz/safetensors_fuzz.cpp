// Fuzz target: a whole .safetensors file (8-byte header length, JSON header, data), opened the
// way `dilu run` opens every shard: memory-mapped, header bounds-checked, tensors handed out.
//
// What must hold for any bytes: SafetensorsFile::open either refuses the file with a UserError or
// hands out tensors that lie inside the file, do not overlap, and whose byte size matches their
// dtype and shape; reading every byte of every tensor stays inside the mapping (ASan checks).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;

namespace {

// One in-memory file for the whole run (no disk traffic per input), opened by its /proc path.
int memfd() {
  static const int fd = [] {
    const int f = ::memfd_create("dilu-fuzz.safetensors", MFD_CLOEXEC);
    if (f < 0) fuzz::bug("memfd_create failed");
    return f;
  }();
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd();
  if (::ftruncate(fd, 0) != 0) fuzz::bug("ftruncate failed");
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) fuzz::bug("pwrite failed");
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  std::shared_ptr<SafetensorsFile> f;
  if (!fuzz::user_errors_only([&] { f = SafetensorsFile::open(path); })) return 0;

  DILU_FUZZ_ASSERT(size >= 8, "a file shorter than its header length was accepted");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  DILU_FUZZ_ASSERT(header_len <= size - 8, "header length past the end accepted");
  const size_t data_size = size - 8 - static_cast<size_t>(header_len);
  std::vector<std::pair<size_t, size_t>> spans;
  uint64_t sum = 0;
  for (const auto& [name, info] : f->tensors()) {
    DILU_FUZZ_ASSERT(info.begin <= info.end && info.end <= data_size, name + ": span outside the data section");
    uint64_t numel = 1;
    for (int64_t d : info.shape) {
      DILU_FUZZ_ASSERT(d >= 0, name + ": negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    DILU_FUZZ_ASSERT(info.end - info.begin == numel * dtype_size(info.dtype), name + ": size does not match the shape");
    if (info.end > info.begin) spans.push_back({info.begin, info.end});
    Tensor t = f->tensor(name);
    DILU_FUZZ_ASSERT(t.nbytes() == info.end - info.begin, name + ": tensor size differs from its span");
    const auto* p = static_cast<const uint8_t*>(t.raw());
    for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];  // every byte readable (ASan watches)
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) DILU_FUZZ_ASSERT(spans[i].first >= spans[i - 1].second, "overlap accepted");
  // Keep the reads alive.
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
