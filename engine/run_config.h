// How a run is set up (parallelism, batching, KV cache, sampling, output): one typed tree, read
// from a YAML file plus `--set key=value` overrides, validated once and immutable afterwards.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace dilu {

struct ParallelConfig {
  int tp = 1;               // tensor-parallel ranks per pipeline stage
  int pp = 1;               // pipeline stages per replica
  int dp = 1;               // data-parallel replicas
  int ep = 0;               // expert-parallel ranks for MoE layers; 0: ep = tp
  std::string layer_split;  // "": automatic, else comma list of layer counts per stage ("30,31")
  friend bool operator==(const ParallelConfig&, const ParallelConfig&) = default;
};

struct BatchConfig {
  int max_seqs = 256;     // sequences decoded together in one step
  int max_tokens = 8192;  // tokens (prefill + decode) processed in one step
  friend bool operator==(const BatchConfig&, const BatchConfig&) = default;
};

struct KvConfig {
  int block_size = 64;            // tokens per KV-cache block
  double memory_fraction = 0.9;   // share of free device memory the KV cache may take
  int num_blocks = 0;             // 0: derive from memory_fraction
  friend bool operator==(const KvConfig&, const KvConfig&) = default;
};

struct ModelRunConfig {
  int max_seq_len = 0;  // prompt + completion limit; 0: the checkpoint's max_position_embeddings
  friend bool operator==(const ModelRunConfig&, const ModelRunConfig&) = default;
};

// Defaults for requests whose input line does not say otherwise.
struct SamplingConfig {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  int top_k = 0;             // 0: no top-k cut
  uint64_t seed = 0;
  int max_tokens = 256;      // default per-request max_tokens
  friend bool operator==(const SamplingConfig&, const SamplingConfig&) = default;
};

struct OutputConfig {
  bool token_ids = true;          // write token ids in output lines
  bool split_reasoning = false;   // put R1's <think>...</think> text in a reasoning_content field
  friend bool operator==(const OutputConfig&, const OutputConfig&) = default;
};

struct CpuConfig {
  int threads = 0;  // 0: all cores
  friend bool operator==(const CpuConfig&, const CpuConfig&) = default;
};

struct CudaConfig {
  std::string fp8_gemm = "auto";  // auto | block | soft
  double nccl_timeout_s = 600;
  std::string kernels = "fast";  // fast | reference (docs/cuda.md)
  bool graphs = true;            // decode steps captured as CUDA graphs and replayed
  friend bool operator==(const CudaConfig&, const CudaConfig&) = default;
};

struct RunConfig {
  std::string backend = "auto";  // cpu | cuda | auto
  ParallelConfig parallel;
  BatchConfig batch;
  KvConfig kv;
  ModelRunConfig model;
  SamplingConfig sampling;
  OutputConfig output;
  CpuConfig cpu;
  CudaConfig cuda;
  friend bool operator==(const RunConfig&, const RunConfig&) = default;
};

// parallel.layer_split: "" (automatic: empty list) or "30,31", a comma list of positive layer
// counts, one per pipeline stage; nullopt when malformed.
std::optional<std::vector<int>> parse_layer_split(const std::string& text);

// One settable key, for `--help` text and error messages.
struct RunConfigKey {
  std::string key;            // dotted path, e.g. "parallel.tp"
  std::string type;           // int, uint64, float, bool or string
  std::string default_value;  // as YAML text
  std::string help;           // one line, ending with the valid range
};

// Defaults, then `yaml_file` (if given), then each override "key=value" in order (value parsed as
// a YAML scalar), then validation. Throws UserError naming the key and the file:line or --set.
RunConfig load_run_config(const std::optional<std::filesystem::path>& yaml_file,
                          const std::vector<std::string>& overrides);

// Every key as YAML; load_run_config of this text gives back an equal config.
std::string run_config_to_yaml(const RunConfig& config);

// All keys in the order run_config_to_yaml prints them.
const std::vector<RunConfigKey>& run_config_keys();

}  // namespace dilu
