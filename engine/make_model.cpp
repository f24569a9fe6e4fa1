// Random-weight checkpoints (see make_model.h). Values come from a counter-based generator keyed by
// (seed, tensor name, element index), so shards can be generated in parallel, in chunks, in any
// order, and the BF16 and FP8 checkpoints of one seed hold the same underlying weights.
#include "engine/make_model.h"

#include "engine/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <system_error>

#include <nlohmann/json.hpp>

#include "engine/safetensors_writer.h"
#include "engine/weight_names.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace dilu {

// ---- Presets -------------------------------------------------------------------------------------

namespace {

// DeepSeek-R1's config.json, field for field.
ModelConfig r1_geometry() {
  ModelConfig c;
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.num_nextn_predict_layers = 1;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.n_shared_experts = 1;
  c.n_routed_experts = 256;
  c.routed_scaling_factor = 2.5;
  c.first_k_dense_replace = 3;
  c.moe_layer_freq = 1;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.norm_topk_prob = true;
  c.topk_method = "noaux_tc";
  c.scoring_func = "sigmoid";
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.hidden_act = "silu";
  c.max_position_embeddings = 163840;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  RopeScaling yarn;
  yarn.factor = 40.0;
  yarn.original_max_position_embeddings = 4096;
  yarn.beta_fast = 32.0;
  yarn.beta_slow = 1.0;
  yarn.mscale = 1.0;
  yarn.mscale_all_dim = 1.0;
  c.rope_scaling = yarn;
  c.tie_word_embeddings = false;
  c.bos_token_id = 0;
  c.eos_token_ids = {1};
  c.torch_dtype = "bfloat16";
  c.quantization = FP8Quantization{};
  return c;
}

// R1's structure scaled down to a few MB: every feature (q LoRA, YaRN, grouped noaux_tc routing,
// a shared expert, dense then MoE layers, partial FP8 blocks: 96, 80 and 64 are below 128).
ModelConfig tiny() {
  ModelConfig c = r1_geometry();
  c.vocab_size = 1024;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 8;
  c.n_routed_experts = 16;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.rope_scaling->original_max_position_embeddings = 256;
  c.max_position_embeddings = 256 * 40;  // R1 too: original * factor
  return c;
}

// The V2-Lite-like variant: queries through q_proj (no q LoRA), one routing group, plain RoPE.
ModelConfig tiny_nolora() {
  ModelConfig c = tiny();
  c.q_lora_rank = std::nullopt;
  c.n_group = 1;
  c.topk_group = 1;
  c.rope_scaling = std::nullopt;
  return c;
}

}  // namespace

const std::vector<ModelPreset>& model_presets() {
  static const std::vector<ModelPreset> presets = {
      {"tiny", "R1's structure at ~7M parameters (hidden 256, 4 layers, 16 experts): tests and demos on a CPU",
       &tiny},
      {"tiny-nolora", "tiny without q LoRA, routing groups or YaRN (a V2-Lite-like variant)", &tiny_nolora},
      {"r1-geometry", "DeepSeek-R1's exact config (671B parameters, 61 layers); use --layers N for a slice",
       &r1_geometry},
  };
  return presets;
}

ModelConfig preset_config(const std::string& preset, int64_t layers) {
  const ModelPreset* found = nullptr;
  std::string valid;
  for (const ModelPreset& p : model_presets()) {
    if (p.name == preset) found = &p;
    valid += (valid.empty() ? "" : ", ") + std::string(p.name);
  }
  DILU_USER_CHECK(found, "unknown model preset '", preset, "'; valid presets: ", valid);
  DILU_USER_CHECK(layers >= 0, "--layers must be positive, got ", layers);
  ModelConfig c = found->config();
  if (layers > 0) {
    c.num_hidden_layers = layers;
    // Keep at least one MoE layer when there is room for one: with fewer layers than the preset's
    // dense prefix plus one, only layer 0 stays dense (a single layer is a dense one).
    if (c.n_routed_experts > 0 && layers <= c.first_k_dense_replace)
      c.first_k_dense_replace = std::min<int64_t>(c.first_k_dense_replace, 1);
  }
  return c;
}

// ---- Random values ------------------------------------------------------------------------------

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s) {  // FNV-1a
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : s) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001b3ull;
  return h;
}

// Uniform values in [center - half_width, center + half_width]; element i of a tensor is the
// i-th output of a splitmix64 stream keyed by the tensor, so any chunk can be made on its own.
struct RandomInit {
  uint64_t key;
  float center, half_width;
  float at(uint64_t i) const {
    const uint64_t bits = mix64(key + (i + 1) * kGolden) >> 40;  // 24 random bits
    const float u = static_cast<float>(bits) * (1.0f / 16777216.0f);  // [0, 1)
    return center + half_width * (2.0f * u - 1.0f);
  }
};

// Scales that keep a random model numerically tame: linear weights with std 1/sqrt(in) keep
// activations O(1) through each layer, embeddings have std 1 (RMSNorm follows), norm weights
// sit near 1 and the router bias near 0 so that routing is mostly decided by the scores.
RandomInit init_for(const WeightSpec& spec, uint64_t seed) {
  const uint64_t key = mix64(hash_name(spec.name)) ^ mix64(seed + kGolden);
  const float sqrt3 = std::sqrt(3.0f);  // a uniform [-a, a] has std a/sqrt(3)
  if (spec.name.ends_with("e_score_correction_bias")) return {key, 0.0f, 0.05f};
  if (spec.shape.size() == 1) return {key, 1.0f, 0.05f};
  if (spec.name == "model.embed_tokens.weight") return {key, 0.0f, sqrt3};
  return {key, 0.0f, sqrt3 / std::sqrt(static_cast<float>(spec.shape[1]))};
}

// ---- Checkpoint plan ----------------------------------------------------------------------------

struct PlannedTensor {
  const WeightSpec* spec;
  DType dtype;
  bool fp8 = false;  // has a "<name>_scale_inv" written right after it
  Shape scale_shape;
  uint64_t bytes = 0;  // the weight plus its scale
};

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::vector<PlannedTensor> plan_tensors(const std::vector<WeightSpec>& specs, const ModelConfig& c) {
  std::vector<PlannedTensor> out;
  for (const WeightSpec& s : specs) {
    PlannedTensor t{&s, DType::BF16, false, {}, 0};
    if (s.name.ends_with("e_score_correction_bias")) t.dtype = DType::F32;  // F32 in R1 as well
    if (c.quantization && s.fp8_in_r1) {
      t.dtype = DType::F8E4M3;
      t.fp8 = true;
      t.scale_shape = scale_shape(s.shape, *c.quantization);
    }
    t.bytes = static_cast<uint64_t>(numel(s.shape)) * dtype_size(t.dtype) +
              (t.fp8 ? static_cast<uint64_t>(numel(t.scale_shape)) * 4 : 0);
    out.push_back(std::move(t));
  }
  return out;
}

// Splits the tensors, in checkpoint order, into about-equal shards of at most ~4 GiB (R1's files
// are ~4.3 GB), and at least two so that readers are always exercised on a sharded checkpoint.
// A tensor goes to the shard where its middle byte falls, so a layer may straddle two shards, as
// in R1's own files.
std::vector<std::vector<const PlannedTensor*>> plan_shards(const std::vector<PlannedTensor>& tensors) {
  constexpr uint64_t kMaxShardBytes = 4ull << 30;
  uint64_t total = 0;
  for (const PlannedTensor& t : tensors) total += t.bytes;
  const uint64_t count = std::max<uint64_t>(2, (total + kMaxShardBytes - 1) / kMaxShardBytes);
  const uint64_t target = std::max<uint64_t>(1, (total + count - 1) / count);
  std::vector<std::vector<const PlannedTensor*>> shards(count);
  uint64_t offset = 0;
  for (const PlannedTensor& t : tensors) {
    shards[std::min<uint64_t>(count - 1, (offset + t.bytes / 2) / target)].push_back(&t);
    offset += t.bytes;
  }
  std::erase_if(shards, [](const auto& shard) { return shard.empty(); });  // only with a single huge tensor
  return shards;
}

// ---- Writing tensors ----------------------------------------------------------------------------

// Below this many elements a parallel region costs more than it saves (tiny's experts are 32K).
constexpr int64_t kMinParallelElements = 1 << 18;

template <class T, class Convert>
void write_elementwise(SafetensorsWriter& w, const RandomInit& init, Convert convert) {
  w.write_tensor([&](std::span<std::byte> chunk, uint64_t offset) {
    const int64_t n = static_cast<int64_t>(chunk.size() / sizeof(T));
    const uint64_t first = offset / sizeof(T);
#pragma omp parallel for schedule(static) if (n >= kMinParallelElements)
    for (int64_t i = 0; i < n; ++i) {
      const T v = convert(init.at(first + static_cast<uint64_t>(i)));
      std::memcpy(chunk.data() + static_cast<size_t>(i) * sizeof(T), &v, sizeof(T));
    }
  });
}

// Quantizes per block_out x block_in block, as DeepSeek's FP8 checkpoints are: scale_inv =
// amax/448 so that each block's largest value maps to FP8's largest. Chunks are whole block rows,
// so a block is generated, scaled and rounded by one thread; the scales go out right after.
void write_fp8(SafetensorsWriter& w, const PlannedTensor& t, const RandomInit& init, const FP8Quantization& q) {
  const int64_t rows = t.spec->shape[0], cols = t.spec->shape[1];
  const int64_t block_rows = t.scale_shape[0], block_cols = t.scale_shape[1];
  const uint64_t block_row_bytes = static_cast<uint64_t>(q.block_out * cols);
  const uint64_t chunk_bytes = block_row_bytes * std::max<uint64_t>(1, (32ull << 20) / block_row_bytes);
  std::vector<float> scales(static_cast<size_t>(block_rows * block_cols));

  w.write_tensor(
      [&](std::span<std::byte> chunk, uint64_t offset) {
        DILU_CHECK(offset % block_row_bytes == 0, "FP8 chunk not aligned to a block row");
        const int64_t rb0 = static_cast<int64_t>(offset / block_row_bytes);
        const int64_t row0 = rb0 * q.block_out;
        const int64_t chunk_rows = static_cast<int64_t>(chunk.size()) / cols;
        const int64_t rb1 = rb0 + (chunk_rows + q.block_out - 1) / q.block_out;
#pragma omp parallel if ((rb1 - rb0) * block_cols * q.block_out * q.block_in >= kMinParallelElements)
        {
          std::vector<float> block(static_cast<size_t>(q.block_out * q.block_in));
#pragma omp for collapse(2) schedule(static)
          for (int64_t rb = rb0; rb < rb1; ++rb) {
            for (int64_t cb = 0; cb < block_cols; ++cb) {
              const int64_t r_begin = rb * q.block_out, r_end = std::min(rows, r_begin + q.block_out);
              const int64_t c_begin = cb * q.block_in, c_end = std::min(cols, c_begin + q.block_in);
              const int64_t width = c_end - c_begin;
              float amax = 0.0f;
              for (int64_t r = r_begin; r < r_end; ++r)
                for (int64_t col = c_begin; col < c_end; ++col) {
                  const float v = init.at(static_cast<uint64_t>(r * cols + col));
                  block[static_cast<size_t>((r - r_begin) * width + (col - c_begin))] = v;
                  amax = std::max(amax, std::fabs(v));
                }
              const float scale_inv = amax > 0.0f ? amax / 448.0f : 1.0f;
              scales[static_cast<size_t>(rb * block_cols + cb)] = scale_inv;
              for (int64_t r = r_begin; r < r_end; ++r)
                for (int64_t col = c_begin; col < c_end; ++col) {
                  const float v = block[static_cast<size_t>((r - r_begin) * width + (col - c_begin))];
                  chunk[static_cast<size_t>((r - row0) * cols + col)] = std::byte{f32_to_fp8e4m3(v / scale_inv)};
                }
            }
          }
        }
      },
      chunk_bytes);
  w.write_tensor(std::as_bytes(std::span<const float>(scales)));
}

void write_planned(SafetensorsWriter& w, const PlannedTensor& t, const ModelConfig& c, uint64_t seed) {
  const RandomInit init = init_for(*t.spec, seed);
  switch (t.dtype) {
    case DType::F8E4M3: write_fp8(w, t, init, *c.quantization); break;
    case DType::BF16: write_elementwise<uint16_t>(w, init, [](float v) { return f32_to_bf16(v); }); break;
    case DType::F32: write_elementwise<float>(w, init, [](float v) { return v; }); break;
    default: DILU_CHECK(false, "make_model cannot write dtype ", dtype_name(t.dtype));
  }
}

void write_text_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  DILU_USER_CHECK(!out.fail(), "cannot write ", path.string(), ": ", std::strerror(errno),
                  "; check that the directory is writable and the disk not full");
}

std::string shard_file_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

bool is_checkpoint_file(const std::string& name) {
  return name == "config.json" || name == "model.safetensors.index.json" ||
         (name.starts_with("model-") &&
          (name.ends_with(".safetensors") || name.ends_with(".safetensors.partial")));
}

// Refuses a non-empty directory without `force`; with it, removes an earlier checkpoint's files
// (a previous run may have had more shards) and leaves anything else in place.
void prepare_out_dir(const std::filesystem::path& dir, bool force) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    DILU_USER_CHECK(fs::is_directory(dir, ec), "--out ", dir.string(), " exists and is not a directory");
    const bool empty = fs::is_empty(dir, ec);
    DILU_USER_CHECK(empty || force, "--out ", dir.string(),
                    " is not empty; choose a new directory or pass --force to replace a checkpoint there");
    for (const fs::directory_entry& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && is_checkpoint_file(e.path().filename().string())) fs::remove(e.path());
  } else {
    fs::create_directories(dir, ec);
    DILU_USER_CHECK(!ec, "cannot create --out directory ", dir.string(), ": ", ec.message());
  }
}

}  // namespace

MakeModelSummary make_model(const MakeModelOptions& o) {
  ModelConfig c = preset_config(o.preset, o.layers);
  if (o.dtype == CheckpointDType::BF16) c.quantization = std::nullopt;
  c.torch_dtype = "bfloat16";
  if (c.quantization)
    DILU_CHECK(c.quantization->block_out > 0 && c.quantization->block_in > 0, "bad FP8 block size");
  std::unique_ptr<Tokenizer> tokenizer;
  if (!o.tokenizer_dir.empty()) {
    tokenizer = Tokenizer::load(o.tokenizer_dir);
    DILU_USER_CHECK(tokenizer != nullptr, "--tokenizer ", o.tokenizer_dir.string(), " holds no tokenizer.json");
    // Published checkpoints pad the embedding past the tokenizer's last id (R1: 129280).
    c.vocab_size = (tokenizer->vocab_size() + 127) / 128 * 128;
    if (tokenizer->bos_id()) c.bos_token_id = *tokenizer->bos_id();
    if (tokenizer->eos_id()) c.eos_token_ids = {*tokenizer->eos_id()};
  }
  try {
    prepare_out_dir(o.out_dir, o.force);
  } catch (const std::filesystem::filesystem_error& e) {
    throw UserError("cannot prepare --out " + o.out_dir.string() + ": " + e.what());
  }

  // The MTP layer (model.layers.<num_hidden_layers>.*) is deliberately not written even though
  // config.json keeps num_nextn_predict_layers like R1: dilu skips it when reading, and it would
  // add a full MoE layer of bytes that nothing uses.
  const std::vector<WeightSpec> specs = model_weight_specs(c);
  const std::vector<PlannedTensor> tensors = plan_tensors(specs, c);
  const auto shards = plan_shards(tensors);

  MakeModelSummary summary;
  for (const WeightSpec& s : specs) summary.num_parameters += numel(s.shape);
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string file = shard_file_name(i, shards.size());
    SafetensorsWriter w(o.out_dir / file);
    for (const PlannedTensor* t : shards[i]) {
      w.declare(t->spec->name, t->dtype, t->spec->shape);
      weight_map[t->spec->name] = file;
      if (t->fp8) {
        w.declare(scale_name(t->spec->name), DType::F32, t->scale_shape);
        weight_map[scale_name(t->spec->name)] = file;
      }
    }
    for (const PlannedTensor* t : shards[i]) write_planned(w, *t, c, o.seed);
    w.finish();
    summary.files.push_back(w.path());
    summary.tensor_bytes += w.data_bytes();
    summary.total_bytes += w.file_bytes();
    if (o.progress)
      o.progress("wrote " + file + " (" + std::to_string(w.file_bytes()) + " bytes, " +
                 std::to_string(shards[i].size()) + " weights)");
  }

  const nlohmann::json index = {{"metadata", {{"total_size", summary.tensor_bytes}}}, {"weight_map", weight_map}};
  std::vector<std::pair<std::string, std::string>> texts = {
      {"model.safetensors.index.json", index.dump(2) + "\n"},
      // Last, so that a directory with a config.json holds a complete checkpoint.
      {"config.json", model_config_to_json(c).dump(2) + "\n"},
  };
  if (tokenizer) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      std::error_code ec;
      std::filesystem::copy_file(o.tokenizer_dir / name, o.out_dir / name,
                                 std::filesystem::copy_options::overwrite_existing, ec);
      DILU_USER_CHECK(!ec, "cannot copy ", (o.tokenizer_dir / name).string(), " to ", o.out_dir.string(), ": ",
                      ec.message());
      summary.files.push_back(o.out_dir / name);
      if (o.progress) o.progress(std::string("copied ") + name);
    }
  }
  for (const auto& [name, text] : texts) {
    write_text_file(o.out_dir / name, text);
    summary.files.push_back(o.out_dir / name);
    summary.total_bytes += text.size();
    if (o.progress) o.progress("wrote " + name);
  }
  return summary;
}

}  // namespace dilu
