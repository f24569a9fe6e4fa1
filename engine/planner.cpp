// The topology planner (see planner.h and docs/planner.md): exact per-rank weight bytes from the
// checkpoint name table, documented per-GPU overheads, and a roofline cost model of one decode step.
#include "engine/planner.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "engine/weight_names.h"
#include "kernels/error.h"

namespace dilu {

namespace {

constexpr uint64_t KiB = 1024, MiB = KiB * 1024, GiB = MiB * 1024;
constexpr double kTB = 1e12, kGB = 1e9;

// ---- Documented constants (docs/planner.md says where each comes from) ----------------------------

// Per-GPU memory the runtime takes besides weights, KV cache and activations: CUDA context with
// cuBLAS/cuBLASLt/NCCL modules loaded (~1 GiB), NCCL channel buffers of the TP and PP communicators
// (~1 GiB), cuBLASLt workspace, CUDA graphs of the decode batch sizes and allocator slack (~1 GiB).
constexpr uint64_t kRuntimeBytes = 3 * GiB;
// Shares of a peak that real kernels reach: decode GEMVs and paged attention stream HBM at ~80% of
// peak; small-M block-scaled GEMMs reach ~60% of tensor-core peak; NCCL rings ~80% of link rate.
constexpr double kHbmEfficiency = 0.8;
constexpr double kComputeEfficiency = 0.6;
constexpr double kLinkEfficiency = 0.8;
// Fixed latencies: a small NCCL all-reduce over NVSwitch (LL protocol) and one point-to-point send.
constexpr double kAllReduceLatency_s = 15e-6;
constexpr double kNvlinkSendLatency_s = 5e-6;
constexpr double kIbSendLatency_s = 10e-6;
// Mean tokens in a sequence's cache while it decodes, unless --context-len says: R1-style generation
// (a ~1K prompt, a few thousand tokens of reasoning and answer) averages ~4K; never above half of
// model.max_seq_len (a sequence growing from 0 to the limit averages half of it).
constexpr int64_t kDefaultContextLen = 4096;

// ---- Small helpers --------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Part r of n items split p ways, as contiguous ranges [floor(r·n/p), floor((r+1)·n/p)).
std::pair<int64_t, int64_t> part_range(int64_t n, int64_t p, int64_t r) { return {r * n / p, (r + 1) * n / p}; }

// Blocks of size `block` that the range [begin, end) touches.
int64_t blocks_touched(int64_t begin, int64_t end, int64_t block) {
  if (end <= begin) return 0;
  return (end - 1) / block - begin / block + 1;
}

bool is_power_of_two(int v) { return v > 0 && (v & (v - 1)) == 0; }

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const std::string& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

std::string fixed(double v, int digits) {
  char text[32];
  std::snprintf(text, sizeof text, "%.*f", digits, v);
  return text;
}
std::string fixed1(double v) { return fixed(v, 1); }

std::string cluster_name(const ClusterShape& c) {
  return std::to_string(c.nodes) + (c.nodes == 1 ? " node × " : " nodes × ") + std::to_string(c.gpus_per_node) +
         " × " + c.gpu.name;
}

std::string layout_name(const ParallelLayout& l) {
  return "tp " + std::to_string(l.tp) + " × pp " + std::to_string(l.pp) + " × dp " + std::to_string(l.dp) +
         " (ep " + std::to_string(l.ep) + ")";
}

}  // namespace

// ---- GPU types ------------------------------------------------------------------------------------

const std::vector<GpuType>& gpu_types() {
  // Memory: nvidia-smi's "FB Memory Total" less "Reserved" (measured on H100 and H200; the others
  // take the published total less 512 MiB). Bandwidths and peaks: the vendors' data sheets, dense.
  static const std::vector<GpuType> types = {
      {"H100-80GB", (81559 - 480) * MiB, 3.35 * kTB, 450 * kGB, 50 * kGB, 989e12, 1979e12,
       "H100 SXM5: 80 GB HBM3 3.35 TB/s, NVLink 900 GB/s, 400 Gb/s IB per GPU, FP8"},
      {"H800-80GB", (81559 - 480) * MiB, 3.35 * kTB, 200 * kGB, 50 * kGB, 989e12, 1979e12,
       "H800 SXM5: as H100 with NVLink 400 GB/s, FP8"},
      {"H200-141GB", (143771 - 616) * MiB, 4.8 * kTB, 450 * kGB, 50 * kGB, 989e12, 1979e12,
       "H200 SXM: 141 GB HBM3e 4.8 TB/s, NVLink 900 GB/s, 400 Gb/s IB per GPU, FP8"},
      {"H20-96GB", (97871 - 512) * MiB, 4.0 * kTB, 450 * kGB, 50 * kGB, 148e12, 296e12,
       "H20: 96 GB HBM3 4.0 TB/s, NVLink 900 GB/s, 400 Gb/s IB per GPU, FP8 (low FLOPs)"},
      {"A100-80GB", (81920 - 512) * MiB, 2.039 * kTB, 300 * kGB, 25 * kGB, 312e12, 0,
       "A100 SXM4 80GB: HBM2e 2.0 TB/s, NVLink 600 GB/s, 200 Gb/s IB per GPU, no FP8 (soft FP8)"},
      {"A100-40GB", (40960 - 512) * MiB, 1.555 * kTB, 300 * kGB, 25 * kGB, 312e12, 0,
       "A100 SXM4 40GB: HBM2 1.55 TB/s, NVLink 600 GB/s, 200 Gb/s IB per GPU, no FP8 (soft FP8)"},
      {"A800-40GB", (40960 - 512) * MiB, 1.555 * kTB, 200 * kGB, 25 * kGB, 312e12, 0,
       "A800 SXM4 40GB: as A100-40GB with NVLink 400 GB/s, no FP8 (soft FP8)"},
  };
  return types;
}

const GpuType& gpu_type(const std::string& name) {
  std::vector<std::string> names;
  for (const GpuType& t : gpu_types()) {
    if (t.name == name) return t;
    names.push_back(t.name);
  }
  throw UserError("unknown GPU type '" + name + "'; known types: " + join(names, ", ") +
                  " (for another GPU pick the closest and set --gpu-memory)");
}

std::string_view weight_dtype_name(WeightDType dtype) {
  switch (dtype) {
    case WeightDType::FP8: return "fp8";
    case WeightDType::SoftFP8: return "soft-fp8";
    case WeightDType::BF16: return "bf16";
  }
  return "?";
}

WeightDType parse_weight_dtype(const std::string& text) {
  for (WeightDType d : {WeightDType::FP8, WeightDType::SoftFP8, WeightDType::BF16})
    if (text == weight_dtype_name(d)) return d;
  throw UserError("--dtype '" + text + "': expected fp8, soft-fp8 or bf16");
}

// ---- Byte sizes -----------------------------------------------------------------------------------

uint64_t parse_byte_size(const std::string& text, const std::string& what) {
  // Binary for the short suffixes (as Slurm's --mem and nvidia-smi's MiB), decimal for "GB"/"TB".
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1.0},           {"B", 1.0},          {"K", 1024.0},       {"KiB", 1024.0},         {"KB", 1e3},
      {"M", 1024.0 * 1024}, {"MiB", 1024.0 * 1024}, {"MB", 1e6},         {"G", double(GiB)},  {"GiB", double(GiB)},
      {"GB", 1e9},         {"T", double(GiB) * 1024}, {"TiB", double(GiB) * 1024}, {"TB", 1e12}};
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  const std::string unit(end, text.data() + text.size());
  if (ec == std::errc() && end != text.data() && std::isfinite(value) && value > 0)
    for (const auto& [name, scale] : kUnits)
      if (unit == name) return static_cast<uint64_t>(value * scale);
  throw UserError(what + " '" + text + "': expected a positive size such as 80GiB, 141GB, 40960MiB or 96G");
}

std::string human_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char text[32];
  std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return text;
}

void split_parallel_overrides(std::vector<std::string>& overrides, PlanOptions& options) {
  const std::pair<const char*, std::optional<int> PlanOptions::*> kKeys[] = {
      {"parallel.tp", &PlanOptions::tp}, {"parallel.pp", &PlanOptions::pp},
      {"parallel.dp", &PlanOptions::dp}, {"parallel.ep", &PlanOptions::ep}};
  std::vector<std::string> kept;
  for (const std::string& text : overrides) {
    const size_t equals = text.find('=');
    const std::string key = text.substr(0, equals), value = equals == std::string::npos ? "" : text.substr(equals + 1);
    const auto* entry = std::find_if(std::begin(kKeys), std::end(kKeys), [&](const auto& k) { return key == k.first; });
    if (entry == std::end(kKeys)) {
      kept.push_back(text);
      continue;
    }
    int number = -1;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), number);
    const bool is_number = ec == std::errc() && end == value.data() + value.size() && number >= 0;
    DILU_USER_CHECK(value == "auto" || is_number, "--set ", text, ": expected a positive integer, or auto (or 0) ",
                    "to let the planner choose");
    if (value == "auto" || number == 0) {
      options.*(entry->second) = std::nullopt;  // chosen; RunConfig keeps its default
    } else {
      options.*(entry->second) = number;
      kept.push_back(text);
    }
  }
  overrides = kept;
}

// ---- Weight bytes per rank ------------------------------------------------------------------------

namespace {

// Bytes held by each TP rank of one layer (or of the embedding, or of the final norm + lm_head).
struct RankBytes {
  std::vector<uint64_t> total;    // [tp rank]
  std::vector<uint64_t> experts;  // [tp rank] the routed experts' part
};

struct WeightTable {
  std::vector<RankBytes> layers;  // [layer]
  RankBytes embedding, head;      // head: model.norm + lm_head
};

// Where each checkpoint tensor lives, parsed once from its name.
struct SpecInfo {
  const WeightSpec* spec;
  int64_t layer;   // -1: embedding / final norm / lm_head
  int64_t expert;  // routed expert index, or -1
  bool is_down;    // down_proj: split by columns when an expert is split
};

class WeightAccounting {
 public:
  WeightAccounting(const ModelConfig& model, WeightDType dtype) : model_(model), dtype_(dtype) {
    specs_ = model_weight_specs(model);
    if (model.quantization) quant_ = *model.quantization;
    for (const WeightSpec& s : specs_) {
      SpecInfo info{&s, layer_of(s.name), -1, s.name.ends_with("down_proj.weight")};
      const size_t at = s.name.find(".mlp.experts.");
      if (at != std::string::npos) info.expert = std::stoll(s.name.substr(at + 13));
      infos_.push_back(info);
      int64_t n = 1;
      for (int64_t dim : s.shape) n *= dim;
      num_parameters_ += n;
    }
  }

  int64_t num_parameters() const { return num_parameters_; }

  const WeightTable& table(int tp, int ep) {
    auto it = tables_.find({tp, ep});
    if (it == tables_.end()) it = tables_.emplace(std::make_pair(tp, ep), build(tp, ep)).first;
    return it->second;
  }

 private:
  // Bytes of rows [r0, r1) × columns [c0, c1) of a tensor (a vector: c0 = 0, c1 = 1).
  uint64_t slice_bytes(const WeightSpec& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
    const uint64_t elements = static_cast<uint64_t>((r1 - r0) * (c1 - c0));
    if (s.fp8_in_r1 && dtype_ != WeightDType::BF16 && s.shape.size() == 2)
      return elements + 4 * static_cast<uint64_t>(blocks_touched(r0, r1, quant_.block_out) *
                                                  blocks_touched(c0, c1, quant_.block_in));
    const uint64_t element_size = s.name.ends_with("e_score_correction_bias") ? 4 : 2;  // F32 in R1's files
    return elements * element_size;
  }

  // What TP rank `r` of `tp` holds of one tensor.
  uint64_t rank_bytes(const SpecInfo& info, int tp, int ep, int r) const {
    const WeightSpec& s = *info.spec;
    const int64_t rows = s.shape[0], cols = s.shape.size() == 2 ? s.shape[1] : 1;
    if (info.expert >= 0) {
      // Experts are placed whole over `ep` groups of tp/ep ranks; inside a group, each expert's
      // gate/up rows and down columns are split tp/ep ways.
      const int inner = tp / ep, group = r / inner, inner_rank = r % inner;
      const auto [e0, e1] = part_range(model_.n_routed_experts, ep, group);
      if (info.expert < e0 || info.expert >= e1) return 0;
      if (inner == 1) return slice_bytes(s, 0, rows, 0, cols);
      if (info.is_down) {
        const auto [c0, c1] = part_range(cols, inner, inner_rank);
        return slice_bytes(s, 0, rows, c0, c1);
      }
      const auto [r0, r1] = part_range(rows, inner, inner_rank);
      return slice_bytes(s, r0, r1, 0, cols);
    }
    switch (s.shard) {
      case ShardDim::Rows: {
        const auto [r0, r1] = part_range(rows, tp, r);
        return slice_bytes(s, r0, r1, 0, cols);
      }
      case ShardDim::Cols: {
        const auto [c0, c1] = part_range(cols, tp, r);
        return slice_bytes(s, 0, rows, c0, c1);
      }
      case ShardDim::None: break;
    }
    return slice_bytes(s, 0, rows, 0, cols);  // norms, router, q_a/kv_a: replicated
  }

  WeightTable build(int tp, int ep) const {
    const RankBytes zero{std::vector<uint64_t>(tp, 0), std::vector<uint64_t>(tp, 0)};
    WeightTable t{std::vector<RankBytes>(model_.num_hidden_layers, zero), zero, zero};
    for (const SpecInfo& info : infos_) {
      RankBytes& into = info.layer >= 0                                   ? t.layers[info.layer]
                        : info.spec->name == "model.embed_tokens.weight" ? t.embedding
                                                                          : t.head;
      for (int r = 0; r < tp; ++r) {
        const uint64_t bytes = rank_bytes(info, tp, ep, r);
        into.total[r] += bytes;
        if (info.expert >= 0) into.experts[r] += bytes;
      }
    }
    return t;
  }

  const ModelConfig& model_;
  WeightDType dtype_;
  FP8Quantization quant_;  // the checkpoint's blocks; 128×128 when a BF16 checkpoint is planned as FP8
  std::vector<WeightSpec> specs_;
  std::vector<SpecInfo> infos_;
  int64_t num_parameters_ = 0;
  std::map<std::pair<int, int>, WeightTable> tables_;
};

// ---- One layout -----------------------------------------------------------------------------------

struct Inputs {
  const ModelConfig& model;
  const ClusterShape& cluster;
  const RunConfig& run;
  WeightDType dtype;
  int64_t max_seq_len, context_len;
  std::vector<int64_t> layer_split;  // fixed by parallel.layer_split, or empty
};

// Contiguous layer ranges for `pp` stages that minimize the heaviest stage's bytes; the first stage
// also carries the embedding, the last the final norm and lm_head.
std::vector<int64_t> balanced_split(const std::vector<uint64_t>& layer_bytes, uint64_t first_extra,
                                    uint64_t last_extra, int pp) {
  const int64_t n = static_cast<int64_t>(layer_bytes.size());
  std::vector<uint64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + layer_bytes[i];
  constexpr uint64_t kInf = std::numeric_limits<uint64_t>::max();
  // best[s][j]: the heaviest stage when the first s stages hold layers [0, j); from[s][j]: where the
  // s-th stage starts.
  std::vector<std::vector<uint64_t>> best(pp + 1, std::vector<uint64_t>(n + 1, kInf));
  std::vector<std::vector<int64_t>> from(pp + 1, std::vector<int64_t>(n + 1, 0));
  best[0][0] = 0;
  for (int s = 1; s <= pp; ++s)
    for (int64_t j = s; j <= n; ++j)
      for (int64_t i = s - 1; i < j; ++i) {
        if (best[s - 1][i] == kInf) continue;
        const uint64_t stage = prefix[j] - prefix[i] + (s == 1 ? first_extra : 0) + (s == pp ? last_extra : 0);
        const uint64_t worst = std::max(best[s - 1][i], stage);
        if (worst < best[s][j]) best[s][j] = worst, from[s][j] = i;
      }
  std::vector<int64_t> counts(pp);
  for (int64_t s = pp, j = n; s >= 1; --s) {
    counts[s - 1] = j - from[s][j];
    j = from[s][j];
  }
  return counts;
}

uint64_t max_of(const std::vector<uint64_t>& v) { return *std::max_element(v.begin(), v.end()); }

// Activations of batch.max_tokens tokens on one rank (BF16, the residual stream in FP32): the widest
// of attention and MLP buffers live at once, plus the gathered FP32 logits of one step's sequences.
uint64_t activation_bytes(const ModelConfig& m, const RunConfig& run, int tp, bool has_lm_head) {
  const int64_t d = m.hidden_size, heads = m.num_attention_heads / tp, latent = m.kv_lora_rank + m.qk_rope_head_dim;
  const int64_t attention = m.q_lora_rank.value_or(0) + latent +
                            heads * (m.qk_head_dim() + latent + m.kv_lora_rank + m.v_head_dim);
  int64_t mlp = 3 * ceil_div(m.intermediate_size, tp);
  if (m.n_routed_experts > 0)  // worst case: every token's experts on this rank
    mlp = std::max(mlp, m.num_experts_per_tok * 3 * m.moe_intermediate_size +
                            3 * ceil_div(m.moe_intermediate_size * m.n_shared_experts, tp) + 2 * m.n_routed_experts);
  const uint64_t per_token = 4 * d + 2 * 2 * d + 2 * std::max(attention, mlp);
  uint64_t bytes = per_token * static_cast<uint64_t>(run.batch.max_tokens);
  if (has_lm_head) bytes += static_cast<uint64_t>(run.batch.max_seqs) * m.vocab_size * 4;
  return bytes;
}

LayoutPlan evaluate(const Inputs& in, WeightAccounting& weights, const ParallelLayout& layout) {
  const ModelConfig& m = in.model;
  const GpuType& gpu = in.cluster.gpu;
  const RunConfig& run = in.run;
  const WeightTable& table = weights.table(layout.tp, layout.ep);
  LayoutPlan plan;
  plan.layout = layout;

  std::vector<uint64_t> layer_bytes;
  for (const RankBytes& l : table.layers) layer_bytes.push_back(max_of(l.total));
  const std::vector<int64_t> counts =
      in.layer_split.empty() ? balanced_split(layer_bytes, max_of(table.embedding.total), max_of(table.head.total),
                                              layout.pp)
                             : in.layer_split;

  const uint64_t latent_bytes = static_cast<uint64_t>(m.kv_lora_rank + m.qk_rope_head_dim) * 2;  // BF16
  const int64_t block = run.kv.block_size;
  const double fraction = run.kv.memory_fraction;
  int64_t first = 0;
  for (int s = 0; s < layout.pp; ++s) {
    StagePlan st;
    st.first_layer = first;
    st.num_layers = counts[s];
    first += counts[s];
    st.has_embedding = s == 0;
    st.has_lm_head = s == layout.pp - 1;
    st.first_rank = s * layout.tp;
    for (int64_t l = st.first_layer; l < st.first_layer + st.num_layers; ++l) st.num_moe_layers += m.is_moe_layer(l);
    for (int r = 0; r < layout.tp; ++r) {  // the heaviest TP rank of the stage
      uint64_t total = 0, experts = 0;
      for (int64_t l = st.first_layer; l < st.first_layer + st.num_layers; ++l) {
        total += table.layers[l].total[r];
        experts += table.layers[l].experts[r];
      }
      if (st.has_embedding) total += table.embedding.total[r];
      if (st.has_lm_head) total += table.head.total[r];
      if (total > st.weight_bytes) st.weight_bytes = total, st.expert_bytes = experts;
    }
    st.runtime_bytes = kRuntimeBytes;
    st.activation_bytes = activation_bytes(m, run, layout.tp, st.has_lm_head);
    st.kv_bytes_per_token = static_cast<uint64_t>(st.num_layers) * latent_bytes;
    const uint64_t block_bytes = static_cast<uint64_t>(block) * st.kv_bytes_per_token;
    const uint64_t used = st.weight_bytes + st.workspace_bytes();
    const uint64_t left = gpu.memory_bytes > used ? gpu.memory_bytes - used : 0;
    const uint64_t one_sequence = static_cast<uint64_t>(ceil_div(in.max_seq_len, block)) * block_bytes;
    if (run.kv.num_blocks > 0) {
      st.kv_bytes = static_cast<uint64_t>(run.kv.num_blocks) * block_bytes;
      st.needed_bytes = used + st.kv_bytes;
    } else {
      st.kv_bytes = static_cast<uint64_t>(static_cast<double>(left) * fraction) / block_bytes * block_bytes;
      st.needed_bytes = used + static_cast<uint64_t>(std::ceil(static_cast<double>(one_sequence) / fraction));
    }
    st.kv_tokens = static_cast<int64_t>(st.kv_bytes / st.kv_bytes_per_token);
    plan.stages.push_back(st);
  }

  // Refusal: the stage that needs the most, with its numbers.
  const auto worst = std::max_element(plan.stages.begin(), plan.stages.end(), [](const auto& a, const auto& b) {
    return a.needed_bytes < b.needed_bytes;
  });
  const std::string where = layout.pp > 1 ? "stage " + std::to_string(worst - plan.stages.begin()) + " (layers " +
                                                std::to_string(worst->first_layer) + "-" +
                                                std::to_string(worst->first_layer + worst->num_layers - 1) + ")"
                                          : "each GPU";
  const uint64_t used = worst->weight_bytes + worst->workspace_bytes();
  if (used > gpu.memory_bytes)
    plan.refusal = where + " needs " + human_bytes(used) + " for weights (" + human_bytes(worst->weight_bytes) +
                   ") and runtime workspace (" + human_bytes(worst->workspace_bytes()) +
                   ") before any KV cache, but a " + gpu.name + " has " + human_bytes(gpu.memory_bytes);
  else if (worst->needed_bytes > gpu.memory_bytes || worst->kv_tokens < in.max_seq_len)
    plan.refusal = where + ": its KV cache holds " + std::to_string(worst->kv_tokens) +
                   " tokens, fewer than one model.max_seq_len sequence (" + std::to_string(in.max_seq_len) +
                   "); it needs " + human_bytes(worst->needed_bytes) + " of " + human_bytes(gpu.memory_bytes);
  for (const StagePlan& other : plan.stages)  // a fixed kv.num_blocks may be short on a lighter stage
    if (plan.refusal.empty() && other.kv_tokens < in.max_seq_len)
      plan.refusal = "a stage's KV cache holds " + std::to_string(other.kv_tokens) +
                     " tokens, fewer than one model.max_seq_len sequence (" + std::to_string(in.max_seq_len) + ")";
  plan.fits = plan.refusal.empty();
  if (!plan.fits) return plan;

  // Roofline of one round: the replica's batch split into micro-batches that pipeline through the
  // stages; each stage streams its weights (experts: only those the micro-batch is routed to) and
  // its KV cache from HBM, or is bound by tensor-core time, then all-reduces and sends on.
  int64_t kv_tokens = std::numeric_limits<int64_t>::max();
  for (const StagePlan& st : plan.stages) kv_tokens = std::min(kv_tokens, st.kv_tokens);
  plan.batch = std::max<int64_t>(1, std::min<int64_t>(run.batch.max_seqs, kv_tokens / in.context_len));
  plan.micro_batches = static_cast<int>(std::min<int64_t>(layout.pp, plan.batch));
  const double b = static_cast<double>(plan.batch) / plan.micro_batches;  // sequences per micro-batch
  const double hbm = gpu.hbm_bytes_per_s * kHbmEfficiency;
  const bool fp8_units = in.dtype == WeightDType::FP8;
  const double weight_flops = (fp8_units ? gpu.fp8_flops : gpu.bf16_flops) * kComputeEfficiency;
  const double bytes_per_param = in.dtype == WeightDType::BF16 ? 2.0 : 1.0;
  const double routed_share = m.n_routed_experts > 0 ? double(m.num_experts_per_tok) / m.n_routed_experts : 0.0;
  const double touched = 1.0 - std::pow(1.0 - routed_share, b);  // experts hit by b tokens, uniform routing
  const double nvlink = gpu.nvlink_bytes_per_s * kLinkEfficiency, ib = gpu.ib_bytes_per_s * kLinkEfficiency;
  const int tp = layout.tp, gpn = in.cluster.gpus_per_node;
  const double ring = tp > 1 ? double(tp - 1) / tp : 0.0;
  const double hidden_bytes = b * m.hidden_size * 2;

  std::vector<StepCost> costs;
  double slowest = 0, sum = 0;
  size_t slowest_stage = 0;
  for (size_t s = 0; s < plan.stages.size(); ++s) {
    StagePlan& st = plan.stages[s];
    StepCost c;
    const double embedding = st.has_embedding ? double(max_of(table.embedding.total)) : 0.0;  // only b rows read
    const double dense = double(st.weight_bytes - st.expert_bytes) - embedding;
    c.weights_s = (dense + double(st.expert_bytes) * touched) / hbm;
    c.kv_s = b * in.context_len * double(st.kv_bytes_per_token) / hbm;
    const double flops = 2.0 * b * (dense + double(st.expert_bytes) * routed_share) / bytes_per_param;
    const double attention_flops = 2.0 * b * in.context_len * st.num_layers * (m.num_attention_heads / tp) *
                                   double(m.kv_lora_rank + m.qk_rope_head_dim + m.kv_lora_rank);
    const double compute = flops / weight_flops + attention_flops / (gpu.bf16_flops * kComputeEfficiency);
    c.compute_s = std::max(0.0, compute - c.weights_s - c.kv_s);
    if (tp > 1) {
      const double all_reduces = 2.0 * st.num_layers + (st.has_embedding ? 1 : 0);
      c.allreduce_s = all_reduces * (kAllReduceLatency_s + 2 * ring * hidden_bytes / nvlink);
      if (st.has_lm_head)  // gather the vocabulary-sharded FP32 logits for sampling
        c.allreduce_s += kAllReduceLatency_s + ring * b * m.vocab_size * 4 / nvlink;
    }
    if (layout.pp > 1) {  // hidden states to the next stage; the last returns token ids to the first
      const int next_rank = st.has_lm_head ? 0 : st.first_rank + tp;
      const bool crosses = st.first_rank / gpn != next_rank / gpn;
      const double bytes = st.has_lm_head ? b * 4 : hidden_bytes;
      c.send_s = crosses ? kIbSendLatency_s + bytes / ib : kNvlinkSendLatency_s + bytes / nvlink;
    }
    st.step_seconds = c.weights_s + c.kv_s + c.compute_s + c.allreduce_s + c.send_s;
    sum += st.step_seconds;
    if (st.step_seconds > slowest) slowest = st.step_seconds, slowest_stage = s;
    costs.push_back(c);
  }
  // A round is bound by the slowest stage serving every micro-batch, or by one micro-batch's trip
  // through all stages and back when there are fewer micro-batches than stages.
  const int mb = plan.micro_batches;
  plan.round_seconds = std::max(mb * slowest, sum);
  plan.bubble_factor = plan.round_seconds / (mb * sum / layout.pp);
  const StepCost& c = costs[slowest_stage];
  plan.cost = {mb * c.weights_s, mb * c.kv_s, mb * c.compute_s, mb * c.allreduce_s, mb * c.send_s};
  plan.tokens_per_s = layout.dp * static_cast<double>(plan.batch) / plan.round_seconds;
  return plan;
}

// Every (tp, pp, dp, ep) the cluster allows: TP groups inside a node, tp a power of two dividing
// the heads, a replica either inside one node or over whole nodes, fixed values honoured.
std::vector<ParallelLayout> layouts(const ModelConfig& m, const ClusterShape& cluster, const PlanOptions& o,
                                    size_t split_stages) {
  const int total = cluster.total_gpus(), gpn = cluster.gpus_per_node;
  std::vector<ParallelLayout> out;
  for (int tp = 1; tp <= gpn; tp *= 2) {
    if (gpn % tp != 0 || m.num_attention_heads % tp != 0 || (o.tp && *o.tp != tp)) continue;
    for (int pp = 1; pp * tp <= total && pp <= m.num_hidden_layers; ++pp) {
      const int replica = tp * pp;
      if (total % replica != 0 || (gpn % replica != 0 && replica % gpn != 0)) continue;
      if ((o.pp && *o.pp != pp) || (split_stages && split_stages != static_cast<size_t>(pp))) continue;
      const int dp = total / replica;
      if (o.dp && *o.dp != dp) continue;
      const int ep = o.ep ? *o.ep : tp;
      if (tp % ep != 0) continue;
      out.push_back({tp, pp, dp, ep});
    }
  }
  return out;
}

void check_fixed(const ModelConfig& m, const ClusterShape& cluster, const PlanOptions& o) {
  const int gpn = cluster.gpus_per_node, total = cluster.total_gpus();
  if (o.tp) {
    DILU_USER_CHECK(is_power_of_two(*o.tp) && m.num_attention_heads % *o.tp == 0, "parallel.tp = ", *o.tp,
                    ": tp must be a power of two dividing the model's ", m.num_attention_heads, " attention heads");
    DILU_USER_CHECK(*o.tp <= gpn && gpn % *o.tp == 0, "parallel.tp = ", *o.tp,
                    ": a TP group must sit inside one node of ", gpn,
                    " GPUs (its all-reduces run twice per layer); use a tp dividing ", gpn, " and add pp or dp");
  }
  if (o.ep && o.tp)
    DILU_USER_CHECK(*o.tp % *o.ep == 0, "parallel.ep = ", *o.ep, " must divide parallel.tp = ", *o.tp,
                    " (experts are placed over the TP group's ranks)");
  const int fixed = o.tp.value_or(1) * o.pp.value_or(1) * o.dp.value_or(1);
  DILU_USER_CHECK(total % fixed == 0 && (!(o.tp && o.pp && o.dp) || fixed == total), "parallel tp × pp × dp = ",
                  o.tp ? std::to_string(*o.tp) : "auto", " × ", o.pp ? std::to_string(*o.pp) : "auto", " × ",
                  o.dp ? std::to_string(*o.dp) : "auto", " cannot use exactly the ", total, " GPUs (",
                  cluster.nodes, " nodes × ", gpn, "); fix fewer of them (auto) or change the cluster shape");
}

std::vector<int64_t> fixed_layer_split(const ModelConfig& m, const RunConfig& run) {
  const auto parsed = parse_layer_split(run.parallel.layer_split);
  DILU_USER_CHECK(parsed.has_value(), "parallel.layer_split \"", run.parallel.layer_split,
                  "\" is not a comma list of positive layer counts");
  const std::vector<int64_t> counts(parsed->begin(), parsed->end());
  int64_t sum = 0;
  for (int64_t c : counts) sum += c;
  DILU_USER_CHECK(counts.empty() || sum == m.num_hidden_layers, "parallel.layer_split \"", run.parallel.layer_split,
                  "\" covers ", sum, " layers but the model has ", m.num_hidden_layers,
                  "; give counts that sum to it, or leave it empty for an automatic split");
  return counts;
}

bool better(const LayoutPlan& a, const LayoutPlan& b) {
  if (a.fits != b.fits) return a.fits;
  if (a.fits) return std::tie(b.tokens_per_s, a.layout.pp) < std::tie(a.tokens_per_s, b.layout.pp);
  // Refused: closest first, by what no KV-cache setting can shrink (weights and workspace).
  const auto used = [](const LayoutPlan& p) {
    uint64_t most = 0;
    for (const StagePlan& st : p.stages) most = std::max(most, st.weight_bytes + st.workspace_bytes());
    return std::make_pair(most, p.max_needed_bytes());
  };
  return used(a) < used(b);
}

WeightDType resolve_dtype(const ModelConfig& m, const GpuType& gpu, const std::optional<WeightDType>& wanted) {
  WeightDType d = wanted.value_or(m.quantization ? WeightDType::FP8 : WeightDType::BF16);
  if (d == WeightDType::FP8 && !gpu.has_fp8()) {
    DILU_USER_CHECK(!wanted, "--dtype fp8: a ", gpu.name, " has no FP8 units; use --dtype soft-fp8 (FP8 weights ",
                    "in memory, dequantized in the kernel) or bf16");
    d = WeightDType::SoftFP8;
  }
  return d;
}

Plan plan_once(const ModelConfig& m, const ClusterShape& cluster, const RunConfig& run, const PlanOptions& o) {
  DILU_USER_CHECK(cluster.nodes >= 1 && cluster.gpus_per_node >= 1, "the cluster needs at least one node of one GPU, ",
                  "got ", cluster.nodes, " × ", cluster.gpus_per_node);
  check_fixed(m, cluster, o);
  Plan plan;
  plan.cluster = cluster;
  plan.dtype = resolve_dtype(m, cluster.gpu, o.dtype);
  plan.max_seq_len = run.model.max_seq_len > 0 ? run.model.max_seq_len : m.max_position_embeddings;
  plan.context_len = std::max<int64_t>(1, std::min(o.context_len > 0 ? o.context_len : kDefaultContextLen,
                                                    o.context_len > 0 ? plan.max_seq_len : plan.max_seq_len / 2));
  WeightAccounting weights(m, plan.dtype);
  plan.num_parameters = weights.num_parameters();
  const WeightTable& whole = weights.table(1, 1);
  plan.model_weight_bytes = whole.embedding.total[0] + whole.head.total[0];
  for (const RankBytes& l : whole.layers) plan.model_weight_bytes += l.total[0];

  const Inputs in{m, cluster, run, plan.dtype, plan.max_seq_len, plan.context_len, fixed_layer_split(m, run)};
  const std::vector<ParallelLayout> candidates = layouts(m, cluster, o, in.layer_split.size());
  DILU_USER_CHECK(!candidates.empty(), "no layout of ", cluster.nodes, " nodes × ", cluster.gpus_per_node,
                  " GPUs satisfies the fixed parallel.* values and the rules (tp a power of two dividing ",
                  m.num_attention_heads, " heads and the GPUs per node; a replica inside one node or over whole ",
                  "nodes; parallel.ep dividing tp); set them to auto");
  for (const ParallelLayout& l : candidates) plan.candidates.push_back(evaluate(in, weights, l));
  std::stable_sort(plan.candidates.begin(), plan.candidates.end(), better);
  plan.best = plan.candidates.front();
  plan.feasible = plan.best.fits;
  return plan;
}

// What would fit when `plan` is refused: more nodes, another GPU type, FP8 weights, a shorter
// model.max_seq_len. Each tried with the layout chosen freely.
std::vector<std::string> suggestions(const ModelConfig& m, const Plan& refused, const RunConfig& run,
                                     const PlanOptions& o) {
  std::vector<std::string> out;
  PlanOptions free = o;
  free.tp = free.pp = free.dp = free.ep = std::nullopt;
  free.suggest = false;
  RunConfig free_run = run;
  free_run.parallel.layer_split.clear();
  const ClusterShape& c = refused.cluster;
  const auto describe = [](const Plan& p) {
    return layout_name(p.best.layout) + ", " + fixed1(p.best.tokens_per_s) + " tok/s predicted";
  };

  for (int nodes = c.nodes + 1; nodes <= std::max(64, 4 * c.nodes); ++nodes) {
    ClusterShape more = c;
    more.nodes = nodes;
    const Plan p = plan_once(m, more, free_run, free);
    if (!p.feasible) continue;
    out.push_back(cluster_name(more) + " fit: " + describe(p));
    break;
  }
  std::vector<std::string> types;
  for (const GpuType& t : gpu_types()) {
    if (t.name == c.gpu.name) continue;
    ClusterShape other = c;
    other.gpu = t;
    PlanOptions o2 = free;
    if (o2.dtype == WeightDType::FP8 && !t.has_fp8()) o2.dtype = WeightDType::SoftFP8;
    if (o2.dtype == WeightDType::SoftFP8 && t.has_fp8()) o2.dtype = WeightDType::FP8;
    const Plan p = plan_once(m, other, free_run, o2);
    if (p.feasible) types.push_back(t.name + " (" + describe(p) + ")");
  }
  if (!types.empty())
    out.push_back("on " + std::to_string(c.nodes) + (c.nodes == 1 ? " node" : " nodes") + " of " +
                  std::to_string(c.gpus_per_node) + " GPUs these types fit: " + join(types, "; "));
  if (refused.dtype == WeightDType::BF16 && m.quantization) {
    PlanOptions fp8 = free;
    fp8.dtype = c.gpu.has_fp8() ? WeightDType::FP8 : WeightDType::SoftFP8;
    const Plan p = plan_once(m, c, free_run, fp8);
    if (p.feasible)
      out.push_back("the checkpoint's own FP8 weights fit (--dtype " + std::string(weight_dtype_name(*fp8.dtype)) +
                    "): " + describe(p));
  }
  // When weights and workspace fit but one max_seq_len sequence's KV cache does not.
  const LayoutPlan& best = refused.best;
  int64_t kv_tokens = std::numeric_limits<int64_t>::max();
  bool weights_fit = true;
  for (const StagePlan& st : best.stages) {
    weights_fit = weights_fit && st.weight_bytes + st.workspace_bytes() < c.gpu.memory_bytes;
    kv_tokens = std::min(kv_tokens, st.kv_tokens);
  }
  if (weights_fit && kv_tokens >= run.kv.block_size)
    out.push_back("set model.max_seq_len to at most " + std::to_string(kv_tokens) + " (" +
                  layout_name(best.layout) + ")");
  return out;
}

// ---- Printing -------------------------------------------------------------------------------------

std::string stage_layers(const StagePlan& st) {
  return std::to_string(st.first_layer) + "-" + std::to_string(st.first_layer + st.num_layers - 1);
}

std::string layer_split_text(const LayoutPlan& p) {
  std::vector<std::string> counts;
  for (const StagePlan& st : p.stages) counts.push_back(std::to_string(st.num_layers));
  return join(counts, ",");
}

std::string pad(const std::string& text, size_t width) {
  // Width in characters; "×" and "…" are one character but more bytes.
  size_t chars = 0;
  for (unsigned char ch : text) chars += (ch & 0xC0) != 0x80;
  return chars >= width ? text + " " : text + std::string(width - chars, ' ');
}

}  // namespace

uint64_t LayoutPlan::max_needed_bytes() const {
  uint64_t most = 0;
  for (const StagePlan& st : stages) most = std::max(most, st.needed_bytes);
  return most;
}

Plan plan_layout(const ModelConfig& model, const ClusterShape& cluster, const RunConfig& run,
                 const PlanOptions& options) {
  Plan plan = plan_once(model, cluster, run, options);
  if (!plan.feasible && options.suggest) plan.suggestions = suggestions(model, plan, run, options);
  return plan;
}

std::string Plan::refusal_message() const {
  const StagePlan* worst = &best.stages.front();
  for (const StagePlan& st : best.stages)
    if (st.needed_bytes > worst->needed_bytes) worst = &st;
  std::string text = "refused: the model does not fit on " + cluster_name(cluster) + ". Closest layout " +
                     layout_name(best.layout) + ": needed per GPU " + human_bytes(worst->needed_bytes) +
                     " (weights " + human_bytes(worst->weight_bytes) + " + workspace " +
                     human_bytes(worst->workspace_bytes()) + " + KV cache for one " + std::to_string(max_seq_len) +
                     "-token sequence), available per GPU " + human_bytes(cluster.gpu.memory_bytes) + "; " +
                     best.refusal + ".";
  if (suggestions.empty()) return text + " Nothing close was found to fit: try more nodes or GPUs with more memory.";
  text += " What would fit:";
  for (const std::string& s : suggestions) text += "\n  - " + s;
  return text;
}

std::string format_plan(const Plan& plan, const std::string& model_label) {
  const ClusterShape& c = plan.cluster;
  std::ostringstream out;
  const bool big = plan.num_parameters >= 1e9;
  out << "model: " << model_label << ", " << fixed1(plan.num_parameters / (big ? 1e9 : 1e6))
      << (big ? " B" : " M") << " parameters, " << weight_dtype_name(plan.dtype) << " weights "
      << (big ? fixed1(plan.model_weight_bytes / 1e9) + " GB (" + human_bytes(plan.model_weight_bytes) + ")"
              : human_bytes(plan.model_weight_bytes))
      << "\n"
      << "cluster: " << cluster_name(c) << " (" << human_bytes(c.gpu.memory_bytes) << ", HBM "
      << fixed(c.gpu.hbm_bytes_per_s / 1e12, 2) << " TB/s, NVLink " << fixed1(c.gpu.nvlink_bytes_per_s / 1e9)
      << " GB/s, IB " << fixed1(c.gpu.ib_bytes_per_s / 1e9) << " GB/s per GPU, "
      << (c.gpu.has_fp8() ? "FP8" : "no FP8") << ")\n"
      << "sequences: model.max_seq_len " << plan.max_seq_len << ", mean decode context " << plan.context_len
      << " tokens\n";
  if (!plan.feasible) {
    out << plan.refusal_message() << "\n";
  } else {
    const LayoutPlan& b = plan.best;
    out << "chosen: " << layout_name(b.layout) << ", layer split " << layer_split_text(b) << "\n\n";
    out << pad("stage", 7) << pad("layers", 8) << pad("ranks", 8) << pad("weights", 11) << pad("workspace", 11)
        << pad("KV cache", 11) << pad("KV tokens", 11) << "decode tok/s/GPU\n";
    for (size_t s = 0; s < b.stages.size(); ++s) {
      const StagePlan& st = b.stages[s];
      out << pad(std::to_string(s), 7) << pad(stage_layers(st), 8)
          << pad(std::to_string(st.first_rank) + "-" + std::to_string(st.first_rank + b.layout.tp - 1), 8)
          << pad(human_bytes(st.weight_bytes), 11) << pad(human_bytes(st.workspace_bytes()), 11)
          << pad(human_bytes(st.kv_bytes), 11) << pad(std::to_string(st.kv_tokens), 11)
          << fixed1(b.tokens_per_s / c.total_gpus()) << "\n";
    }
    out << "\npredicted decode: " << fixed1(b.tokens_per_s) << " tok/s for the cluster (" << b.layout.dp
        << " replica(s) × batch " << b.batch << ", " << b.micro_batches << " micro-batch(es)), round "
        << fixed1(b.round_seconds * 1e3) << " ms = weights " << fixed1(b.cost.weights_s * 1e3) << " + KV "
        << fixed1(b.cost.kv_s * 1e3) << " + compute " << fixed1(b.cost.compute_s * 1e3) << " + all-reduce "
        << fixed1(b.cost.allreduce_s * 1e3) << " + sends " << fixed1(b.cost.send_s * 1e3) << " ms, bubble ×"
        << fixed1(b.bubble_factor) << "\n";
  }
  out << "\nlayouts considered:\n";
  for (const LayoutPlan& p : plan.candidates) {
    out << "  " << pad(layout_name(p.layout), 28);
    if (p.fits)
      out << fixed1(p.tokens_per_s) << " tok/s (batch " << p.batch << ", split " << layer_split_text(p) << ")\n";
    else
      out << "does not fit: " << p.refusal << "\n";
  }
  return out.str();
}

nlohmann::json plan_to_json(const Plan& plan, const std::string& model_label) {
  using nlohmann::json;
  const auto layout_json = [&](const LayoutPlan& p) {
    json stages = json::array();
    for (const StagePlan& st : p.stages)
      stages.push_back({{"first_layer", st.first_layer},
                        {"num_layers", st.num_layers},
                        {"num_moe_layers", st.num_moe_layers},
                        {"has_embedding", st.has_embedding},
                        {"has_lm_head", st.has_lm_head},
                        {"first_rank", st.first_rank},
                        {"weight_bytes", st.weight_bytes},
                        {"expert_bytes", st.expert_bytes},
                        {"runtime_bytes", st.runtime_bytes},
                        {"activation_bytes", st.activation_bytes},
                        {"workspace_bytes", st.workspace_bytes()},
                        {"kv_bytes_per_token", st.kv_bytes_per_token},
                        {"kv_bytes", st.kv_bytes},
                        {"kv_tokens", st.kv_tokens},
                        {"needed_bytes", st.needed_bytes},
                        {"step_seconds", st.step_seconds}});
    json j = {{"tp", p.layout.tp},
              {"pp", p.layout.pp},
              {"dp", p.layout.dp},
              {"ep", p.layout.ep},
              {"layer_split", layer_split_text(p)},
              {"fits", p.fits},
              {"stages", stages}};
    if (p.fits) {
      j["batch"] = p.batch;
      j["micro_batches"] = p.micro_batches;
      j["round_seconds"] = p.round_seconds;
      j["bubble_factor"] = p.bubble_factor;
      j["cost_seconds"] = {{"weights", p.cost.weights_s},
                           {"kv", p.cost.kv_s},
                           {"compute", p.cost.compute_s},
                           {"allreduce", p.cost.allreduce_s},
                           {"send", p.cost.send_s}};
      j["tokens_per_s"] = p.tokens_per_s;
      j["tokens_per_s_per_gpu"] = p.tokens_per_s / plan.cluster.total_gpus();
    } else {
      j["refusal"] = p.refusal;
    }
    return j;
  };
  const GpuType& g = plan.cluster.gpu;
  json j = {{"model", model_label},
            {"feasible", plan.feasible},
            {"dtype", std::string(weight_dtype_name(plan.dtype))},
            {"num_parameters", plan.num_parameters},
            {"model_weight_bytes", plan.model_weight_bytes},
            {"max_seq_len", plan.max_seq_len},
            {"context_len", plan.context_len},
            {"cluster",
             {{"nodes", plan.cluster.nodes},
              {"gpus_per_node", plan.cluster.gpus_per_node},
              {"gpu", g.name},
              {"memory_bytes", g.memory_bytes},
              {"hbm_bytes_per_s", g.hbm_bytes_per_s},
              {"nvlink_bytes_per_s", g.nvlink_bytes_per_s},
              {"ib_bytes_per_s", g.ib_bytes_per_s},
              {"fp8", g.has_fp8()}}},
            {"plan", layout_json(plan.best)}};
  if (!plan.feasible) {
    j["needed_bytes_per_gpu"] = plan.best.max_needed_bytes();
    j["available_bytes_per_gpu"] = g.memory_bytes;
    j["refusal"] = plan.refusal_message();
    j["suggestions"] = plan.suggestions;
  }
  j["candidates"] = json::array();
  for (const LayoutPlan& p : plan.candidates) j["candidates"].push_back(layout_json(p));
  return j;
}

std::vector<int64_t> stage_layer_counts(const ModelConfig& model, const RunConfig& run, int tp, int pp) {
  std::vector<int64_t> counts = fixed_layer_split(model, run);
  if (!counts.empty()) {
    DILU_USER_CHECK(static_cast<int>(counts.size()) == pp, "parallel.layer_split \"", run.parallel.layer_split,
                    "\" has ", counts.size(), " stages but parallel.pp is ", pp);
    return counts;
  }
  DILU_USER_CHECK(pp <= model.num_hidden_layers, "parallel.pp = ", pp, " exceeds the model's ",
                  model.num_hidden_layers, " layers");
  WeightAccounting weights(model, model.quantization ? WeightDType::FP8 : WeightDType::BF16);
  const WeightTable& table = weights.table(tp, tp);
  std::vector<uint64_t> layer_bytes;
  for (const RankBytes& l : table.layers) layer_bytes.push_back(max_of(l.total));
  return balanced_split(layer_bytes, max_of(table.embedding.total), max_of(table.head.total), pp);
}

}  // namespace dilu
