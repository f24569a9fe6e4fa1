// The run loop of this version: requests one after another, each prefilled in one step and
// decoded token by token over its own paged cache blocks.
#include "engine/run_job.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>

#include "engine/deepseek_v3.h"
#include "engine/jsonl_writer.h"
#include "engine/block_manager.h"
#include "engine/kv_cache.h"
#include "engine/request.h"
#include "engine/safetensors.h"

namespace dilu {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Completion {
  std::vector<int32_t> tokens;
  std::string finish_reason;
};

// Greedy generation of one request over freshly allocated cache blocks.
Completion generate(DeepseekV3& model, Ops& ops, KvCache& cache, BlockManager& block_manager, const Request& r,
                    int64_t max_seq_len) {
  const ModelConfig& c = model.config();
  Completion out{{}, "length"};
  const int64_t prompt_len = static_cast<int64_t>(r.prompt.size());
  const int64_t limit = std::min<int64_t>(r.max_tokens, max_seq_len - prompt_len);
  if (limit <= 0) return out;
  std::vector<int32_t> blocks;
  const int64_t needed = cache.blocks_for(prompt_len + limit);
  DILU_CHECK(block_manager.can_allocate(needed), "KV cache too small for one request");
  block_manager.allocate(needed, blocks);

  StepInput step;
  step.layout.block_size = cache.block_size();
  step.layout.block_tables = {blocks};
  auto place = [&](int64_t pos) {
    step.layout.token_seq.push_back(0);
    step.layout.token_pos.push_back(static_cast<int32_t>(pos));
    step.layout.token_slot.push_back(static_cast<int64_t>(blocks[static_cast<size_t>(pos / cache.block_size())]) *
                                         cache.block_size() + pos % cache.block_size());
  };
  step.token_ids = r.prompt;
  for (int64_t p = 0; p < prompt_len; ++p) place(p);
  step.logit_rows = {static_cast<int32_t>(prompt_len - 1)};
  for (;;) {
    Tensor logits = model.forward(step, cache);
    const int32_t next = ops.argmax(logits)[0];
    out.tokens.push_back(next);
    const bool eos = std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), next) != c.eos_token_ids.end();
    if (eos && !r.ignore_eos) {
      out.finish_reason = "stop";
      break;
    }
    if (static_cast<int64_t>(out.tokens.size()) >= limit) break;
    step.token_ids = {next};
    step.layout.token_seq.clear();
    step.layout.token_pos.clear();
    step.layout.token_slot.clear();
    place(prompt_len + static_cast<int64_t>(out.tokens.size()) - 1);
    step.logit_rows = {0};
  }
  block_manager.release(blocks);
  return out;
}

}  // namespace

RunSummary run_job(const RunJobOptions& o, const RunConfig& cfg, std::ostream& log) {
  RunSummary s;
  const auto t_load = Clock::now();
  const ModelConfig mc = load_model_config(o.model_dir);
  std::ifstream in(o.input);
  DILU_USER_CHECK(in.good(), "cannot read input file '", o.input.string(), "'");
  const Checkpoint ckpt = Checkpoint::open(o.model_dir);
  std::unique_ptr<Ops> ops = make_ops(cfg.backend, cfg.cpu.threads);
  DeepseekV3 model(mc, ckpt, *ops);
  const RequestLimits limits = request_limits(mc, cfg);

  // The cache holds batch.max_seqs sequences of model.max_seq_len tokens, or what
  // kv.memory_fraction of free memory allows, or exactly kv.num_blocks.
  const int64_t block_size = cfg.kv.block_size;
  const int64_t entry_bytes = (mc.kv_lora_rank + mc.qk_rope_head_dim) * static_cast<int64_t>(dtype_size(ops->activation_dtype()));
  const int64_t block_bytes = entry_bytes * block_size * mc.num_hidden_layers;
  const int64_t blocks_per_seq = (limits.max_seq_len + block_size - 1) / block_size;
  int64_t num_blocks = cfg.kv.num_blocks;
  if (num_blocks == 0) {
    const auto budget = static_cast<int64_t>(cfg.kv.memory_fraction * static_cast<double>(ops->free_memory_bytes()));
    num_blocks = std::min<int64_t>(budget / block_bytes, blocks_per_seq * cfg.batch.max_seqs);
  }
  DILU_USER_CHECK(num_blocks >= 1, "the KV cache gets no block: ", block_bytes, " bytes per block of ", block_size,
                  " tokens do not fit; lower kv.block_size or model.max_seq_len, or raise kv.memory_fraction");
  KvCache cache(*ops, mc.num_hidden_layers, num_blocks, block_size, mc.kv_lora_rank + mc.qk_rope_head_dim);
  BlockManager block_manager(num_blocks);
  s.load_seconds = seconds_since(t_load);
  log << "dilu: model loaded in " << s.load_seconds << " s on " << ops->name() << "; KV cache " << num_blocks
      << " blocks of " << block_size << " tokens (" << (num_blocks * block_bytes >> 20) << " MiB)\n";

  JsonlWriter writer(o.output);
  const auto t_gen = Clock::now();
  std::string text;
  int64_t line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are not requests
    auto parsed = parse_request(text, line, limits);
    if (auto* err = std::get_if<RequestError>(&parsed)) {
      writer.write(error_record(*err));
      ++s.requests_failed;
      log << "dilu: " << err->message << "\n";
      continue;
    }
    const Request& r = std::get<Request>(parsed);
    if (cache.blocks_for(std::min<int64_t>(static_cast<int64_t>(r.prompt.size()) + r.max_tokens, limits.max_seq_len)) >
        cache.num_blocks()) {
      RequestError e{line, r.id,
                     "line " + std::to_string(line) + ": prompt plus max_tokens needs more KV-cache blocks than exist (" +
                         std::to_string(num_blocks) + "); lower max_tokens or raise kv.num_blocks"};
      writer.write(error_record(e));
      ++s.requests_failed;
      continue;
    }
    Completion done = generate(model, *ops, cache, block_manager, r, limits.max_seq_len);
    writer.write(completion_record(r, done.tokens, done.finish_reason, cfg.output.token_ids));
    ++s.requests_done;
    s.prompt_tokens += static_cast<int64_t>(r.prompt.size());
    s.completion_tokens += static_cast<int64_t>(done.tokens.size());
  }
  DILU_USER_CHECK(!in.bad(), "error reading input file '", o.input.string(), "' at line ", line + 1);
  writer.sync();
  s.generate_seconds = seconds_since(t_gen);
  return s;
}

}  // namespace dilu
