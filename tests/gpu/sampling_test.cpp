// GPU tests (label "gpu"): cuda::sample_rows picks the host sampler's token (engine/sampler.h)
// and its logprobs, over vocabularies, batch sizes, sampling parameters and awkward logits.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kernels/cuda/sampling.h"
#include "tests/gpu/cuda_device.h"

namespace dilu {
namespace {

using cuda::SampleRowParams;
using cuda::SampleRowResult;

// Both sides compute log_softmax in double and round it to float: the doubles differ by the
// order of a sum (~1e-12 relative for 129280 terms) and an ulp of log, so the floats are equal or
// neighbours; one float ulp is at most 1.5e-5 for |logprob| < 256, which every finite logprob here
// is (logits stay within +-60).
constexpr float kLogprobTolerance = 2e-5f;
// Host and device weigh each token with bit-identical floats (the same exp_nonpositive, rounded
// the same way), make the same exact top-k and min-p comparisons, and place every nucleus goal and
// CDF step within ~1e-12 of the total mass of each other (host: double sums in its order;
// device: exact fixed-point sums). So a draw whose device token stays put when its uniform moves
// by this much must give the host's token ("stable"); an unstable one lies within rounding of a
// CDF step, where summation order decides, and may differ.
constexpr double kUniformNudge = 1e-9;
// With random uniforms a draw is unstable with probability ~(kept tokens) * 2e-9 <= 3e-4; the
// bound only keeps a systematic error from hiding among them. A nucleus goal within 1e-12 of a
// step (a flip nudging u cannot see) is rarer still: ~1e-12 / (mass of the crossing token).
constexpr double kMinSameFraction = 0.995;

#define DILU_SKIP_WITHOUT_DEVICE()                                              \
  do {                                                                          \
    const std::string dilu_why = missing_cuda_device();                              \
    if (!dilu_why.empty()) GTEST_SKIP() << "no CUDA device: " << dilu_why;      \
  } while (0)

template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) {
    const cudaError_t rc = cudaMalloc(&data_, std::max<size_t>(n, 1) * sizeof(T));
    EXPECT_EQ(rc, cudaSuccess) << "cudaMalloc: " << cudaGetErrorString(rc);
  }
  ~DeviceArray() { cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
};

class Stream {
 public:
  Stream() { EXPECT_EQ(cudaStreamCreate(&stream_), cudaSuccess); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

void expect_cuda(cudaError_t rc, const char* what) { EXPECT_EQ(rc, cudaSuccess) << what << ": " << cudaGetErrorString(rc); }

// sample_rows over logits already on the device. The results are poisoned first with 0x7f bytes
// (an id of 2139062143, a logprob of 3.4e38: neither can be an output) so a field the kernel
// leaves unwritten fails the comparison.
std::vector<SampleRowResult> run_device(const float* logits, int64_t vocab, const std::vector<SampleRowParams>& params,
                                        cudaStream_t stream) {
  const auto rows = static_cast<int64_t>(params.size());
  DeviceArray<SampleRowParams> d_params(params.size());
  DeviceArray<SampleRowResult> d_results(params.size());
  const size_t workspace_bytes = cuda::sample_rows_workspace_bytes(rows, vocab);
  DeviceArray<unsigned char> workspace(workspace_bytes);
  std::vector<SampleRowResult> out(params.size());
  expect_cuda(cudaMemcpyAsync(d_params.get(), params.data(), params.size() * sizeof(SampleRowParams),
                              cudaMemcpyHostToDevice, stream),
              "copy params");
  expect_cuda(cudaMemsetAsync(d_results.get(), 0x7f, params.size() * sizeof(SampleRowResult), stream), "poison");
  cuda::sample_rows(logits, vocab, d_params.get(), d_results.get(), rows, workspace.get(), workspace_bytes, stream);
  expect_cuda(cudaMemcpyAsync(out.data(), d_results.get(), out.size() * sizeof(SampleRowResult),
                              cudaMemcpyDeviceToHost, stream),
              "copy results");
  expect_cuda(cudaStreamSynchronize(stream), "sample_rows");
  return out;
}

struct Config {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  bool logprobs;
  int32_t top_logprobs;
};

// Greedy, and temperature x top_k x top_p x min_p, each with logprobs off, on, and with 5 and 20
// top logprobs.
std::vector<Config> sampling_grid() {
  struct Logprobs {
    bool on;
    int32_t top;
  };
  const std::array<Logprobs, 4> logprobs = {{{false, 0}, {true, 0}, {true, 5}, {true, 20}}};
  std::vector<Config> out;
  for (const Logprobs lp : logprobs) {
    out.push_back({0.0f, 0, 1.0f, 0.0f, lp.on, lp.top});
    for (const float temperature : {0.7f, 1.0f, 1.5f})
      for (const int32_t top_k : {0, 1, 5, 50})
        for (const float top_p : {1.0f, 0.9f, 0.3f})
          for (const float min_p : {0.0f, 0.05f}) out.push_back({temperature, top_k, top_p, min_p, lp.on, lp.top});
  }
  return out;
}

// The host's parameters hold exactly the floats the device gets (0.7f, not 0.7), so both sides
// start from the same 1/T, top_p and min_p.
SamplingParams host_params(const Config& c) {
  SamplingParams p;
  p.temperature = static_cast<double>(c.temperature);
  p.top_k = c.top_k;
  p.top_p = static_cast<double>(c.top_p);
  p.min_p = static_cast<double>(c.min_p);
  p.logprobs = c.logprobs;
  p.top_logprobs = c.top_logprobs;
  return p;
}

SampleRowParams device_params(const Config& c, int32_t row, double uniform) {
  return SampleRowParams{row, c.temperature, c.top_p, c.top_k, c.min_p, uniform, c.logprobs ? 1 : 0, c.top_logprobs};
}

// Kinds of rows: smooth; coarse (many equal logits); masked (-inf entries); flat (all equal);
// wide (weights that underflow to 0).
constexpr int kKinds = 5;
void fill_row(std::span<float> row, int kind, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> fifth(0, 4);
  const float inf = std::numeric_limits<float>::infinity();
  for (float& x : row) {
    const float g = normal(rng);
    switch (kind) {
      case 0: x = 2.5f * g; break;
      case 1: x = std::round(4.0f * g) / 2.0f; break;
      case 2: x = fifth(rng) < 2 ? -inf : 2.5f * g; break;
      case 3: x = 1.25f; break;
      default: x = std::clamp(15.0f * g, -60.0f, 60.0f); break;
    }
  }
  if (std::none_of(row.begin(), row.end(), [inf](float x) { return x > -inf; })) row[0] = 0.0f;
}

void expect_logprob(float device, float host, const std::string& where) {
  if (std::isinf(host))
    EXPECT_EQ(device, host) << where;
  else
    EXPECT_NEAR(device, host, kLogprobTolerance) << where;
}

struct Tally {
  int64_t draws = 0;     // sampled (not greedy) tokens compared
  int64_t same = 0;      // of which the device drew the host's token
  int64_t unstable = 0;  // of which a nudge moved the device's token

  void expect_within_bounds(const std::string& what) const {
    std::cout << what << ": " << draws << " draws, " << same << " identical, " << unstable << " unstable\n";
    EXPECT_GE(static_cast<double>(same), kMinSameFraction * static_cast<double>(draws)) << what;
    EXPECT_LE(static_cast<double>(unstable), (1.0 - kMinSameFraction) * static_cast<double>(draws)) << what;
  }
};

// One batch: host[r] is the host's sample of the logits row that params[r] reads, with the same
// key and configs[r]; `nudged` the device's results for the batch with its uniforms moved
// (run_nudged, defined below).
void compare_batch(int64_t vocab, const std::vector<Config>& configs,
                   const std::vector<SampleRowParams>& params, const std::vector<SampleResult>& host,
                   const std::vector<SampleRowResult>& device,
                   const std::vector<std::vector<SampleRowResult>>& nudged, Tally& tally, const std::string& where) {
  for (size_t r = 0; r < params.size(); ++r) {
    const Config& c = configs[r];
    const SampleResult& h = host[r];
    const SampleRowResult& d = device[r];
    const std::string at = where + " row " + std::to_string(r) + " (T " + std::to_string(c.temperature) + ", top_k " +
                           std::to_string(c.top_k) + ", top_p " + std::to_string(c.top_p) + ", min_p " +
                           std::to_string(c.min_p) + ", u " + std::to_string(params[r].uniform) + ")";
    const bool exact = c.temperature == 0.0f || c.top_k == 1 || vocab == 1;  // the first argmax, whatever u
    if (exact) {
      EXPECT_EQ(d.token, h.token) << at;
    } else {
      bool stable = true;
      for (const auto& n : nudged) stable = stable && n[r].token == d.token;
      ++tally.draws;
      tally.same += d.token == h.token ? 1 : 0;
      tally.unstable += stable ? 0 : 1;
      if (stable) {
        EXPECT_EQ(d.token, h.token) << at << ": a draw away from any CDF step";
      }
    }
    ASSERT_GE(d.token, 0) << at;
    ASSERT_LT(d.token, vocab) << at;

    const size_t top = c.logprobs ? static_cast<size_t>(std::min<int64_t>(c.top_logprobs, vocab)) : 0;
    ASSERT_EQ(h.top.size(), top) << at;
    if (!c.logprobs) {
      EXPECT_EQ(d.logprob, 0.0f) << at;
    } else if (d.token == h.token) {
      expect_logprob(d.logprob, h.logprob, at + ": logprob");
    }
    // The top ids come from comparing raw logits (and ids on ties), no arithmetic: identical.
    for (size_t j = 0; j < top; ++j) {
      EXPECT_EQ(d.top_ids[j], h.top[j].first) << at << ": top " << j;
      expect_logprob(d.top_logprobs[j], h.top[j].second, at + ": top logprob " + std::to_string(j));
    }
    for (size_t j = top; j < static_cast<size_t>(cuda::kMaxTopLogprobs); ++j) {
      EXPECT_EQ(d.top_ids[j], -1) << at << ": unused top " << j;
      EXPECT_EQ(d.top_logprobs[j], 0.0f) << at << ": unused top " << j;
    }
  }
}

// The device's results for `params` with the uniform moved down and up by kUniformNudge.
std::vector<std::vector<SampleRowResult>> run_nudged(const float* logits, int64_t vocab,
                                                     const std::vector<SampleRowParams>& params, cudaStream_t stream) {
  std::vector<std::vector<SampleRowResult>> out;
  for (const double nudge : {-kUniformNudge, kUniformNudge}) {
    std::vector<SampleRowParams> moved = params;
    for (SampleRowParams& p : moved) p.uniform = std::clamp(p.uniform + nudge, 0.0, std::nextafter(1.0, 0.0));
    out.push_back(run_device(logits, vocab, moved, stream));
  }
  return out;
}

bool same_bytes(const std::vector<SampleRowResult>& a, const std::vector<SampleRowResult>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(SampleRowResult)) == 0;
}

class CudaSamplingGrid : public ::testing::TestWithParam<int64_t> {};

// Every grid config meets each batch size; rows cycle through the kinds of logits, and the
// params read the logits rows in reverse, so `row` is honoured.
TEST_P(CudaSamplingGrid, MatchesTheHostSampler) {
  DILU_SKIP_WITHOUT_DEVICE();
  const int64_t vocab = GetParam();
  const std::vector<Config> grid = sampling_grid();
  const Stream stream;
  std::mt19937 rng(static_cast<uint32_t>(vocab));
  Tally tally;
  int64_t launch = 0;
  for (const int64_t rows : {int64_t{1}, int64_t{3}, int64_t{64}}) {
    const auto batches = (static_cast<int64_t>(grid.size()) + rows - 1) / rows;
    for (int64_t b = 0; b < batches; ++b, ++launch) {
      std::vector<float> logits(static_cast<size_t>(rows * vocab));
      for (int64_t r = 0; r < rows; ++r)
        fill_row(std::span(logits).subspan(static_cast<size_t>(r * vocab), static_cast<size_t>(vocab)),
                 static_cast<int>((launch + r) % kKinds), rng);
      DeviceArray<float> d_logits(logits.size());
      expect_cuda(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice),
                  "copy logits");

      std::vector<Config> configs;
      std::vector<SampleRowParams> params;
      std::vector<SampleResult> host;
      const auto seed = static_cast<uint64_t>(0x5eed0000 + launch);
      for (int64_t r = 0; r < rows; ++r) {
        const Config& c = grid[static_cast<size_t>(b * rows + r) % grid.size()];
        const int64_t row = rows - 1 - r, position = 3 * launch + 1;
        const std::span<const float> row_logits(logits.data() + row * vocab, static_cast<size_t>(vocab));
        configs.push_back(c);
        params.push_back(device_params(c, static_cast<int32_t>(row), sample_uniform(seed, r, position)));
        host.push_back(sample(row_logits, host_params(c), seed, r, position));
      }
      const std::vector<SampleRowResult> device = run_device(d_logits.get(), vocab, params, stream.get());
      EXPECT_TRUE(same_bytes(device, run_device(d_logits.get(), vocab, params, stream.get())))
          << "a rerun differs: the kernel is not deterministic";
      compare_batch(vocab, configs, params, host, device,
                    run_nudged(d_logits.get(), vocab, params, stream.get()), tally,
                    "V " + std::to_string(vocab) + ", " + std::to_string(rows) + " rows, batch " + std::to_string(b));
      if (HasFatalFailure()) return;
    }
  }
  tally.expect_within_bounds("V " + std::to_string(vocab));
}

INSTANTIATE_TEST_SUITE_P(Vocab, CudaSamplingGrid, ::testing::Values(int64_t{1}, int64_t{7}, int64_t{256}, int64_t{129280}),
                         [](const ::testing::TestParamInfo<int64_t>& param) { return "V" + std::to_string(param.param); });

// Many draws of one DeepSeek-sized row (every params row reads logits row 0): the CDF walk meets
// targets all over the vocabulary, with and without cuts.
TEST(CudaSampling, ManyDrawsOfOneRowFollowTheHost) {
  DILU_SKIP_WITHOUT_DEVICE();
  constexpr int64_t kVocab = 129280, kDraws = 512;
  const Stream stream;
  std::mt19937 rng(99);
  std::vector<float> logits(kVocab);
  fill_row(logits, 0, rng);
  DeviceArray<float> d_logits(logits.size());
  expect_cuda(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice),
              "copy logits");
  const std::array<Config, 4> kinds = {{{1.0f, 0, 1.0f, 0.0f, true, 3},
                                        {1.0f, 0, 0.9f, 0.0f, false, 0},
                                        {0.7f, 50, 0.95f, 0.05f, true, 0},
                                        {1.5f, 0, 1.0f, 0.02f, false, 0}}};
  std::vector<Config> configs;
  std::vector<SampleRowParams> params;
  std::vector<SampleResult> host;
  for (int64_t i = 0; i < kDraws; ++i) {
    const Config& c = kinds[static_cast<size_t>(i) % kinds.size()];
    configs.push_back(c);
    params.push_back(device_params(c, 0, sample_uniform(7, 0, i)));
    host.push_back(sample(logits, host_params(c), 7, 0, i));
  }
  Tally tally;
  compare_batch(kVocab, configs, params, host, run_device(d_logits.get(), kVocab, params, stream.get()),
                run_nudged(d_logits.get(), kVocab, params, stream.get()), tally, "one row");
  tally.expect_within_bounds("one row, many draws");
}

// The host aborts on a NaN logit and on a row of -inf; the device marks such a row with token -1
// (logprobs NaN) and samples its neighbours as usual.
TEST(CudaSampling, NaNOrAllMaskedRowsGiveNoToken) {
  DILU_SKIP_WITHOUT_DEVICE();
  constexpr int64_t kVocab = 300, kRows = 5;
  const Stream stream;
  std::mt19937 rng(5);
  std::vector<float> logits(kRows * kVocab);
  for (int64_t r = 0; r < kRows; ++r)
    fill_row(std::span(logits).subspan(static_cast<size_t>(r * kVocab), static_cast<size_t>(kVocab)), 0, rng);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  logits[1 * kVocab + 150] = nan;
  logits[2 * kVocab + 7] = -nan;
  std::fill_n(logits.begin() + 3 * kVocab, kVocab, -inf);
  DeviceArray<float> d_logits(logits.size());
  expect_cuda(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice),
              "copy logits");
  for (const float temperature : {0.0f, 1.0f}) {
    SCOPED_TRACE(temperature);
    const Config c{temperature, 0, 0.9f, 0.0f, true, 5};
    std::vector<SampleRowParams> params;
    for (int32_t r = 0; r < kRows; ++r) params.push_back(device_params(c, r, sample_uniform(1, r, 0)));
    const std::vector<SampleRowResult> device = run_device(d_logits.get(), kVocab, params, stream.get());
    for (const int64_t r : {1, 2, 3}) {
      EXPECT_EQ(device[static_cast<size_t>(r)].token, -1) << "row " << r;
      EXPECT_TRUE(std::isnan(device[static_cast<size_t>(r)].logprob)) << "row " << r;
    }
    for (const int64_t r : {0, 4}) {
      const std::span<const float> row(logits.data() + r * kVocab, static_cast<size_t>(kVocab));
      const SampleResult h = sample(row, host_params(c), 1, r, 0);
      EXPECT_EQ(device[static_cast<size_t>(r)].token, h.token) << "row " << r;
      for (size_t j = 0; j < h.top.size(); ++j) EXPECT_EQ(device[static_cast<size_t>(r)].top_ids[j], h.top[j].first);
    }
  }
}

// Few rows find their maximum in a first pass over parts of each row (sample_rows_workspace_bytes
// > 0). An odd vocabulary puts rows off 16 bytes and leaves a scalar tail; the parts must keep the
// first of tied maxima, a NaN in the last part's tail, a row of -inf, and a maximum at the end.
TEST(CudaSampling, FirstPassOverPartsOfFewRows) {
  DILU_SKIP_WITHOUT_DEVICE();
  for (const int64_t vocab : {int64_t{10001}, int64_t{12288}}) {
    SCOPED_TRACE(vocab);
    constexpr int64_t kRows = 5;
    ASSERT_GT(cuda::sample_rows_workspace_bytes(kRows, vocab), 0u) << "the first pass does not run";
    const Stream stream;
    std::mt19937 rng(11);
    std::vector<float> logits(kRows * vocab);
    for (int64_t r = 0; r < kRows; ++r)
      fill_row(std::span(logits).subspan(static_cast<size_t>(r * vocab), static_cast<size_t>(vocab)), 0, rng);
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    for (const int64_t i : {int64_t{9000}, int64_t{100}, int64_t{5000}}) logits[static_cast<size_t>(i)] = 1e30f;
    logits[static_cast<size_t>(1 * vocab + vocab - 2)] = nan;
    std::fill_n(logits.begin() + 2 * vocab, vocab, -inf);
    logits[static_cast<size_t>(3 * vocab + vocab - 1)] = 1e30f;
    logits[static_cast<size_t>(4 * vocab + 4097)] = inf;
    DeviceArray<float> d_logits(logits.size());
    expect_cuda(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice),
                "copy logits");
    const Config c{0.0f, 0, 1.0f, 0.0f, true, 3};
    std::vector<SampleRowParams> params;
    for (int32_t r = 0; r < kRows; ++r) params.push_back(device_params(c, r, 0.5));
    const std::vector<SampleRowResult> device = run_device(d_logits.get(), vocab, params, stream.get());
    EXPECT_EQ(device[0].token, 100);
    EXPECT_EQ(device[1].token, -1) << "a NaN in the last part";
    EXPECT_EQ(device[2].token, -1) << "a row of -inf";
    EXPECT_EQ(device[3].token, vocab - 1);
    EXPECT_EQ(device[4].token, 4097);
    for (const int64_t r : {0, 3}) {
      const std::span<const float> row(logits.data() + r * vocab, static_cast<size_t>(vocab));
      const SampleResult h = sample(row, host_params(c), 1, r, 0);
      EXPECT_EQ(device[static_cast<size_t>(r)].token, h.token) << "row " << r;
      for (size_t j = 0; j < h.top.size(); ++j) EXPECT_EQ(device[static_cast<size_t>(r)].top_ids[j], h.top[j].first);
    }
  }
}

TEST(CudaSampling, NoRowsLaunchNothing) {
  DILU_SKIP_WITHOUT_DEVICE();
  cuda::sample_rows(nullptr, 256, nullptr, nullptr, 0, nullptr, cuda::sample_rows_workspace_bytes(0, 256), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace dilu
