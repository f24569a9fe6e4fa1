// The run config's one field table (key, member, valid range, help) drives YAML parsing, --set
// overrides, validation, printing and the key list; nothing else names a key.
#include "engine/run_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include "kernels/error.h"

namespace dilu {

std::optional<std::vector<int>> parse_layer_split(const std::string& text) {
  std::vector<int> counts;
  if (text.empty()) return counts;
  std::istringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    int count = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), count);
    if (ec != std::errc() || end != item.data() + item.size() || count < 1) return std::nullopt;
    counts.push_back(count);
  }
  if (text.back() == ',') return std::nullopt;
  return counts;
}

namespace {

namespace fs = std::filesystem;

using FieldRef = std::variant<int*, uint64_t*, double*, bool*, std::string*>;

struct Field {
  const char* key;                      // dotted path, also the member path in RunConfig
  FieldRef (*ref)(RunConfig&);          // where the value lives
  bool (*valid)(const RunConfig&);      // range check, run once after all sources are applied
  const char* rule;                     // what `valid` accepts, in words
  const char* help;
};


// The key text and the member path are one token, so they cannot drift apart. In `valid_expr`,
// `v` is the field's value; comparisons are written so that NaN fails them.
#define DILU_RUN_FIELD(path, valid_expr, rule, help)                                          \
  Field {                                                                                     \
    #path, [](RunConfig& c) -> FieldRef { return &c.path; },                                  \
        [](const RunConfig& c) {                                                              \
          [[maybe_unused]] const auto& v = c.path;                                            \
          return static_cast<bool>(valid_expr);                                               \
        },                                                                                    \
        rule, help                                                                            \
  }

const Field kFields[] = {
    DILU_RUN_FIELD(backend, v == "cpu" || v == "cuda" || v == "auto", "cpu, cuda or auto",
                   "compute backend; auto picks cuda when this build has it and a GPU is visible"),
    DILU_RUN_FIELD(parallel.tp, v >= 1, ">= 1", "tensor-parallel ranks per pipeline stage [this version: 1]"),
    DILU_RUN_FIELD(parallel.pp, v >= 1, ">= 1", "pipeline stages per replica [this version: 1]"),
    DILU_RUN_FIELD(parallel.dp, v >= 1, ">= 1", "data-parallel replicas, each a full model copy [this version: 1]"),
    DILU_RUN_FIELD(parallel.ep, v >= 0, ">= 0", "expert-parallel ranks for MoE layers; 0: same as tp [not used yet]"),
    DILU_RUN_FIELD(parallel.layer_split, parse_layer_split(v).has_value(),
                   "empty or a comma list of positive ints, one per stage",
                   "layers per pipeline stage, e.g. \"30,31\"; empty: automatic [not used yet]"),
    DILU_RUN_FIELD(batch.max_seqs, v >= 1, ">= 1", "most sequences decoded together in one step; sizes the KV cache"),
    DILU_RUN_FIELD(batch.max_tokens, v >= 1, ">= 1", "most tokens (prefill + decode) in one step"),
    DILU_RUN_FIELD(kv.block_size, v >= 1, ">= 1", "tokens per KV-cache block"),
    DILU_RUN_FIELD(kv.memory_fraction, v > 0.0 && v <= 1.0, "in (0, 1]",
                   "share of free device memory the KV cache may take"),
    DILU_RUN_FIELD(kv.num_blocks, v >= 0, ">= 0", "KV-cache blocks per rank; 0: derive from memory_fraction"),
    DILU_RUN_FIELD(model.max_seq_len, v >= 0, ">= 0",
                   "prompt + completion token limit; 0: the checkpoint's max_position_embeddings"),
    DILU_RUN_FIELD(sampling.temperature, v >= 0.0, ">= 0", "default temperature; 0: greedy"),
    DILU_RUN_FIELD(sampling.top_p, v > 0.0 && v <= 1.0, "in (0, 1]", "default nucleus cut; 1: off"),
    DILU_RUN_FIELD(sampling.top_k, v >= 0, ">= 0", "default top-k cut; 0: off"),
    DILU_RUN_FIELD(sampling.seed, true, "any", "base seed for requests that give none"),
    DILU_RUN_FIELD(sampling.max_tokens, v >= 0, ">= 0", "default max_tokens for requests that give none"),
    DILU_RUN_FIELD(output.token_ids, true, "true or false", "write token ids in output lines"),
    DILU_RUN_FIELD(output.split_reasoning, true, "true or false",
                   "put the model's <think>...</think> text in a reasoning_content field, as DeepSeek's API"),
    DILU_RUN_FIELD(cpu.threads, v >= 0, ">= 0", "CPU backend threads per rank; 0: all cores"),
    DILU_RUN_FIELD(cuda.fp8_gemm, v == "auto" || v == "block" || v == "soft", "auto, block or soft",
                   "FP8 weights: block = cuBLASLt FP8 with DeepSeek block scales (sm_90; on the CPU: its input "
                   "rounding), soft = dequantized in the GEMM with BF16 math; auto: block where supported"),
    DILU_RUN_FIELD(cuda.nccl_timeout_s, v > 0.0, "> 0",
                   "seconds a collective may wait for a peer before every rank gives up"),
    DILU_RUN_FIELD(cuda.kernels, v == "reference" || v == "fast", "reference or fast",
                   "CUDA kernels: fast = fused MLA (all heads of a block share each pass over the latent cache, "
                   "split-KV, absorption as batched GEMMs) and small-batch expert GEMMs; reference = one block per "
                   "(token, head) and tiled FP32 GEMMs, the kernels fast is tested against (docs/cuda.md)"),
    DILU_RUN_FIELD(cuda.graphs, true, "true or false",
                   "run decode steps as CUDA graphs, one captured per batch shape and replayed (single-rank "
                   "runs); false: launch every kernel from the host"),
};

#undef DILU_RUN_FIELD

const Field* find_field(const std::string& key) {
  for (const Field& field : kFields)
    if (key == field.key) return &field;
  return nullptr;
}

std::string join_key(const std::string& section, const std::string& name) {
  return section.empty() ? name : section + "." + name;
}

// Sections are the proper prefixes of field keys; "" is the root.
bool is_section(const std::string& key) {
  if (key.empty()) return true;
  for (const Field& field : kFields)
    if (std::string(field.key).starts_with(key + ".")) return true;
  return false;
}

// Direct children of a section, in table order: "batch" -> {"max_seqs", "max_tokens"}.
std::vector<std::string> section_children(const std::string& section) {
  std::vector<std::string> names;
  const std::string prefix = section.empty() ? "" : section + ".";
  for (const Field& field : kFields) {
    std::string key = field.key;
    if (!key.starts_with(prefix)) continue;
    std::string name = key.substr(prefix.size(), key.find('.', prefix.size()) - prefix.size());
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  return names;
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const std::string& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string leaf_name(const std::string& key) { return key.substr(key.rfind('.') + 1); }

// "unknown key 'batch.max_seq'; did you mean 'batch.max_seqs'?" or the section's keys.
std::string unknown_key_message(const std::string& key) {
  std::vector<std::string> candidates;  // every key and every section
  for (const Field& field : kFields) {
    std::string full = field.key;
    for (size_t dot = full.find('.'); dot != std::string::npos; dot = full.find('.', dot + 1))
      if (std::find(candidates.begin(), candidates.end(), full.substr(0, dot)) == candidates.end())
        candidates.push_back(full.substr(0, dot));
    candidates.push_back(full);
  }
  const size_t limit = key.size() <= 4 ? 1 : key.size() <= 10 ? 2 : 3;
  std::vector<std::pair<size_t, std::string>> near;
  for (const std::string& candidate : candidates) {
    const size_t distance = edit_distance(key, candidate);
    const bool same_leaf = key.find('.') != std::string::npos && leaf_name(key) == leaf_name(candidate);
    if (distance <= limit || same_leaf) near.emplace_back(same_leaf ? 0 : distance, candidate);
  }
  std::stable_sort(near.begin(), near.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string message = "unknown key '" + key + "'";
  if (!near.empty()) {
    std::vector<std::string> names;
    for (size_t i = 0; i < near.size() && i < 3; ++i) names.push_back("'" + near[i].second + "'");
    return message + "; did you mean " + join(names, " or ") + "?";
  }
  std::string section;  // the deepest known section the key starts with
  for (size_t dot = key.find('.'); dot != std::string::npos; dot = key.find('.', dot + 1)) {
    if (!is_section(key.substr(0, dot))) break;
    section = key.substr(0, dot);
  }
  if (section.empty()) return message + "; top-level keys are: " + join(section_children(""), ", ");
  return message + "; section '" + section + "' has keys: " + join(section_children(section), ", ");
}

// Where a value came from: "runs/a.yaml:12" for a file node, "--set key=value" for an override.
struct Source {
  std::string file;      // empty for an override
  std::string override;  // the whole "key=value" text
  std::string at(const YAML::Mark& mark) const {
    if (file.empty()) return "--set " + override;
    return mark.is_null() ? file : file + ":" + std::to_string(mark.line + 1);
  }
};

const char* node_kind(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a sequence";
    case YAML::NodeType::Null: return "no value";
    default: return "a scalar";
  }
}

const char* type_name(const FieldRef& ref) {
  static const char* const kNames[] = {"int", "uint64", "float", "bool", "string"};
  return kNames[ref.index()];
}

const char* type_wanted(const FieldRef& ref) {
  static const char* const kWanted[] = {"an integer", "a non-negative integer", "a number",
                                        "true or false", "a string"};
  return kWanted[ref.index()];
}

// Decimal only (yaml-cpp's own conversion would read "010" as octal); a leading '+' is allowed.
template <class Number>
bool parse_number(std::string text, Number& out) {
  if (text.starts_with('+')) text.erase(0, 1);
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty();
}

// Parses `text` into the field; false when it is not of the field's type.
bool parse_scalar(const std::string& text, const FieldRef& ref) {
  struct Parser {
    const std::string& text;
    bool operator()(int* out) const { return parse_number(text, *out); }
    bool operator()(uint64_t* out) const { return parse_number(text, *out); }
    bool operator()(double* out) const {
      double value = 0;
      if (!parse_number(text, value) || !std::isfinite(value)) return false;
      *out = value;
      return true;
    }
    bool operator()(bool* out) const {
      std::string lower = text;
      std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
      if (lower == "true" || lower == "yes" || lower == "on") return *out = true, true;
      if (lower == "false" || lower == "no" || lower == "off") return *out = false, true;
      return false;
    }
    bool operator()(std::string* out) const { return *out = text, true; }
  };
  return std::visit(Parser{text}, ref);
}

std::string format_value(const FieldRef& ref) {
  struct Formatter {
    std::string operator()(const int* value) const { return std::to_string(*value); }
    std::string operator()(const uint64_t* value) const { return std::to_string(*value); }
    std::string operator()(const double* value) const {
      char buffer[64];
      const auto [end, ec] = std::to_chars(buffer, buffer + sizeof(buffer), *value);  // shortest round trip
      std::string text(buffer, ec == std::errc() ? end : buffer);
      if (text.find_first_of(".en") == std::string::npos) text += ".0";  // keep it visibly a float
      return text;
    }
    std::string operator()(const bool* value) const { return *value ? "true" : "false"; }
    std::string operator()(const std::string* value) const {
      YAML::Emitter emitter;
      emitter << YAML::DoubleQuoted << *value;
      return emitter.c_str();
    }
  };
  return std::visit(Formatter{}, ref);
}

class Loader {
 public:
  // Applies `node` at `key`: a leaf value, or a mapping into a section ("" is the root).
  void apply(const std::string& key, const YAML::Node& node, const YAML::Mark& key_mark, const Source& source) {
    if (const Field* field = find_field(key)) return set_field(*field, node, source);
    if (!is_section(key)) throw UserError(source.at(key_mark) + ": " + unknown_key_message(key));
    if (node.IsNull()) return;  // "batch:" with nothing under it
    const std::string name = key.empty() ? "the run config" : "'" + key + "'";
    DILU_USER_CHECK(node.IsMap(), source.at(node.Mark()), ": ", name, " is a section and needs a mapping of ",
                    "its keys (", join(section_children(key), ", "), "), got ", node_kind(node));
    for (const auto& entry : node) {
      DILU_USER_CHECK(entry.first.IsScalar(), source.at(entry.first.Mark()), ": ", name,
                      " has a key that is not a plain name (", node_kind(entry.first), ")");
      apply(join_key(key, entry.first.Scalar()), entry.second, entry.first.Mark(), source);
    }
  }

  // All range errors at once, each naming the key, its value and where it was set.
  RunConfig validated() {
    std::vector<std::string> errors;
    for (const Field& field : kFields) {
      if (field.valid(config_)) continue;
      errors.push_back(origin(field.key) + ": " + field.key + " = " + format_value(field.ref(config_)) +
                       " is invalid; it must be " + field.rule);
    }
    const auto stages = parse_layer_split(config_.parallel.layer_split);
    if (stages && !stages->empty() && static_cast<int>(stages->size()) != config_.parallel.pp)
      errors.push_back(origin("parallel.layer_split") + ": parallel.layer_split lists " +
                       std::to_string(stages->size()) + " stages but parallel.pp = " +
                       std::to_string(config_.parallel.pp) + " (" + origin("parallel.pp") +
                       "); give one layer count per pipeline stage");
    if (!errors.empty()) throw UserError("invalid run config:\n  " + join(errors, "\n  "));
    return config_;
  }

 private:
  void set_field(const Field& field, const YAML::Node& node, const Source& source) {
    const FieldRef ref = field.ref(config_);
    const std::string where = source.at(node.Mark()) + ": " + field.key + ": ";
    if (node.IsNull() && std::holds_alternative<std::string*>(ref)) {
      *std::get<std::string*>(ref) = "";
    } else {
      DILU_USER_CHECK(node.IsScalar(), where, "expected ", type_wanted(ref), ", got ", node_kind(node));
      DILU_USER_CHECK(parse_scalar(node.Scalar(), ref), where, "expected ", type_wanted(ref), ", got '",
                      node.Scalar(), "'");
    }
    origins_[field.key] = source.at(node.Mark());
  }

  std::string origin(const std::string& key) const {
    const auto it = origins_.find(key);
    return it == origins_.end() ? "default" : it->second;
  }

  RunConfig config_;
  std::map<std::string, std::string> origins_;  // key -> where its value was last set
};

YAML::Node read_yaml_file(const fs::path& path) {
  std::error_code ec;
  const std::string name = path.string();
  DILU_USER_CHECK(fs::exists(path, ec), "run config file '", name, "' not found (working directory: ",
                  fs::current_path(ec).string(), "); check the --config path");
  DILU_USER_CHECK(!fs::is_directory(path, ec), "run config '", name, "' is a directory; pass a YAML file, ",
                  "e.g. configs/runs/default.yaml");
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  DILU_USER_CHECK(in.good() || in.eof(), "cannot read run config file '", name, "'; check its permissions");
  try {
    return YAML::Load(text.str());
  } catch (const YAML::Exception& e) {
    throw UserError(name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                    ": YAML syntax error: " + e.msg + "; fix the file (see configs/runs/default.yaml)");
  }
}

}  // namespace

RunConfig load_run_config(const std::optional<fs::path>& yaml_file, const std::vector<std::string>& overrides) {
  Loader loader;
  if (yaml_file) loader.apply("", read_yaml_file(*yaml_file), YAML::Mark::null_mark(), Source{yaml_file->string(), ""});
  for (const std::string& text : overrides) {
    const Source source{"", text};
    const size_t equals = text.find('=');
    DILU_USER_CHECK(equals != std::string::npos && equals > 0, "--set ", text, ": expected KEY=VALUE, ",
                    "e.g. --set parallel.tp=8 (keys: dilu run --help)");
    YAML::Node value;
    try {
      value = YAML::Load(text.substr(equals + 1));
    } catch (const YAML::Exception& e) {
      throw UserError("--set " + text + ": cannot read the value as YAML: " + e.msg + "; quote it");
    }
    loader.apply(text.substr(0, equals), value, YAML::Mark::null_mark(), source);
  }
  return loader.validated();
}

std::string run_config_to_yaml(const RunConfig& config) {
  RunConfig copy = config;  // Field::ref wants a mutable config; printing must not need one
  std::ostringstream out;
  std::vector<std::string> open;  // sections of the previous key
  for (const Field& field : kFields) {
    std::vector<std::string> parts;
    std::istringstream key(field.key);
    for (std::string part; std::getline(key, part, '.');) parts.push_back(part);
    size_t common = 0;
    while (common < open.size() && common + 1 < parts.size() && open[common] == parts[common]) ++common;
    for (size_t depth = common; depth + 1 < parts.size(); ++depth)
      out << std::string(2 * depth, ' ') << parts[depth] << ":\n";
    out << std::string(2 * (parts.size() - 1), ' ') << parts.back() << ": " << format_value(field.ref(copy)) << "\n";
    open.assign(parts.begin(), parts.end() - 1);
  }
  return out.str();
}

const std::vector<RunConfigKey>& run_config_keys() {
  static const std::vector<RunConfigKey> keys = [] {
    RunConfig defaults;
    std::vector<RunConfigKey> list;
    for (const Field& field : kFields) {
      const FieldRef ref = field.ref(defaults);
      list.push_back({field.key, type_name(ref), format_value(ref), std::string(field.help) + " (" + field.rule + ")"});
    }
    return list;
  }();
  return keys;
}

}  // namespace dilu
