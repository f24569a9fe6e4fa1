// See bench.h.
#include "engine/bench.h"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <random>

#include "engine/deepseek_v3.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/safetensors.h"

namespace dilu {

std::vector<BenchRow> run_bench(const BenchOptions& o, const RunConfig& cfg, std::ostream& log) {
  const ModelConfig mc = load_model_config(o.model_dir);
  const Checkpoint ckpt = Checkpoint::open(o.model_dir);
  BackendOptions bo;
  bo.cpu_threads = cfg.cpu.threads;
  bo.fp8_gemm = cfg.cuda.fp8_gemm;
  const int64_t largest_batch = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  bo.arena_bytes = DeepseekV3::step_scratch_bytes(mc, std::max<int64_t>(cfg.batch.max_tokens, largest_batch),
                                                  largest_batch, 1);
  std::unique_ptr<Ops> ops = make_ops(cfg.backend, bo);
  DeepseekV3 model(mc, ckpt, *ops);
  const int64_t seq_len = o.input_len + o.output_len;
  DILU_USER_CHECK(o.input_len >= 1 && o.output_len >= 1, "--input-len and --output-len must be at least 1");
  DILU_USER_CHECK(seq_len <= mc.max_position_embeddings, "--input-len + --output-len = ", seq_len,
                  " exceeds the model's max_position_embeddings ", mc.max_position_embeddings);
  const int64_t bs = cfg.kv.block_size;
  const int64_t largest = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  // The cache holds every sequence of the largest batch at full length: no preemption in the
  // measurement.
  const int64_t num_blocks = (seq_len + bs - 1) / bs * largest;
  KvCache cache(*ops, mc.num_hidden_layers, num_blocks, bs, mc.kv_lora_rank + mc.qk_rope_head_dim);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(mc.vocab_size - 1));

  std::vector<BenchRow> rows;
  for (int64_t batch : o.batch_sizes) {
    EngineOptions eo;
    eo.limits = {batch, std::max<int64_t>(cfg.batch.max_tokens, batch), bs};
    eo.max_seq_len = seq_len;
    Engine engine(model, *ops, cache, eo, nullptr);
    for (int64_t i = 0; i < batch; ++i) {
      EngineRequest r;
      r.handle = i;
      for (int64_t t = 0; t < o.input_len; ++t) r.prompt.push_back(token(rng));
      r.sampling.temperature = 0;
      r.sampling.max_tokens = o.output_len;
      r.sampling.ignore_eos = true;
      engine.submit(std::move(r));
    }
    BenchRow row;
    row.batch = batch;
    while (!engine.idle()) {
      const auto t0 = std::chrono::steady_clock::now();
      engine.step();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const StepStats& st = engine.last_step();
      if (st.prefill_tokens > 0) {
        row.prefill_seconds += dt;
        row.prefill_tokens += st.prefill_tokens;
      } else {
        row.decode_seconds += dt;
        row.decode_tokens += st.decode_tokens;
        ++row.decode_steps;
      }
    }
    log << "dilu bench: batch " << batch << " done\n";
    rows.push_back(row);
  }
  return rows;
}

}  // namespace dilu
