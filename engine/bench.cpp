// See bench.h.
#include "engine/bench.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <iostream>
#include <map>
#include <random>

#include "engine/deepseek_v3.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/make_model.h"
#include "engine/planner.h"
#include "engine/run_job.h"
#include "engine/weight_names.h"
#include "engine/safetensors.h"
#include "engine/trace.h"

namespace dilu {

namespace {

int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// What a step must read and compute, from the checkpoint's own form of each tensor (FP8 with
// block scales where R1 has them, BF16 otherwise): the ideal implementation's traffic.
struct ModelCosts {
  double fixed_bytes = 0;       // every weight but the routed experts and the embedding table
  double expert_bytes = 0;      // one routed expert (gate, up, down with scales)
  double kv_bytes_per_token = 0;  // one cached token over all layers (BF16 latent + rope key)
  double params_per_token = 0;  // multiply-adds per token through the linears (K routed experts)
  double head_params = 0;       // lm_head, once per logits row
  // Multiply-adds per (token, attended position): MLA's expanded form, nope + R for the score and
  // v for the output per head, the least of its two forms (the absorbed one takes 2 C + R).
  double attn_per_ctx = 0;
};

ModelCosts model_costs(const ModelConfig& c) {
  ModelCosts m;
  double experts_total = 0, expert_params_total = 0;
  int64_t expert_count = 0;
  for (const WeightSpec& spec : model_weight_specs(c)) {
    const double n = static_cast<double>(numel_of(spec.shape));
    double bytes = n * 2;
    if (spec.name.ends_with("e_score_correction_bias")) bytes = n * 4;
    else if (c.quantization && spec.fp8_in_r1)
      bytes = n + 4.0 * static_cast<double>(numel_of(scale_shape(spec.shape, *c.quantization)));
    if (spec.name.find(".mlp.experts.") != std::string::npos) {
      experts_total += bytes;
      expert_params_total += n;
      if (spec.name.ends_with("gate_proj.weight")) ++expert_count;
      continue;
    }
    if (spec.name == "model.embed_tokens.weight") continue;
    m.fixed_bytes += bytes;
    if (spec.name == "lm_head.weight") m.head_params = n;
    else if (spec.shape.size() == 2) m.params_per_token += n;
  }
  if (expert_count > 0) {
    m.expert_bytes = experts_total / static_cast<double>(expert_count);
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l);
    m.params_per_token += expert_params_total / static_cast<double>(expert_count) *
                          static_cast<double>(c.num_experts_per_tok * moe_layers);
  }
  m.kv_bytes_per_token = 2.0 * static_cast<double>((c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers);
  m.attn_per_ctx = static_cast<double>(c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim) * c.num_hidden_layers);
  return m;
}

// The best throughput of this backend's linear() on the model's own GEMM shapes at `m` tokens,
// in FLOP/s: the prefill's ceiling. FP8 weights when the model has them.
double measure_gemm_peak(Ops& ops, const ModelConfig& c, int64_t m, std::ostream& log) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{c.kv_lora_rank + c.qk_rope_head_dim, d},
                                                      {d, h * c.v_head_dim}};
  if (c.q_lora_rank) {
    shapes.push_back({*c.q_lora_rank, d});
    shapes.push_back({h * c.qk_head_dim(), *c.q_lora_rank});
  }
  if (c.n_routed_experts > 0) {
    shapes.push_back({c.moe_intermediate_size, d});
    shapes.push_back({d, c.moe_intermediate_size});
  }
  shapes.push_back({c.intermediate_size, d});
  double best = 0;
  uint64_t key = 0x5eed;
  for (const auto& [n, k] : shapes) {
    LinearWeight w;
    if (c.quantization) {
      const Shape ws{n, k}, ss = scale_shape(ws, *c.quantization);
      const Tensor wq = ops.random_fill(DType::F8E4M3, ws, key + 1, 0.0f, 448.0f);
      const Tensor sq = ops.random_fill(DType::F32, ss, key + 2, 1.0f / 448.0f / std::sqrt(static_cast<float>(k)), 0.0f);
      key += 2;
      w = ops.place_linear(wq, sq, c.quantization->block_out, c.quantization->block_in);
    } else {
      w = ops.place_linear(ops.random_fill(DType::BF16, {n, k}, ++key, 0.0f, 1.0f / std::sqrt(static_cast<float>(k))),
                           Tensor(), 0, 0);
    }
    Tensor x = ops.random_fill(DType::F32, {m, k}, ++key, 0.0f, 1.0f);
    Tensor y = ops.empty(DType::F32, {m, n});
    ops.linear(x, w, y);  // warm-up (and the algorithm choice)
    ops.synchronize();
    constexpr int kReps = 5;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kReps; ++r) ops.linear(x, w, y);
    ops.synchronize();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double flops = 2.0 * static_cast<double>(m * n * k) * kReps / dt;
    log << "dilu bench: linear " << m << " x " << n << " x " << k << ": " << flops / 1e12 << " TFLOP/s\n";
    best = std::max(best, flops);
  }
  return best;
}

}  // namespace

std::vector<BenchRow> run_bench(const BenchOptions& o, const RunConfig& cfg, std::ostream& log) {
  const auto t_start = std::chrono::steady_clock::now();
  ParallelGroups single;
  if (!o.groups) single = make_parallel_groups(World{}, 1, 1, 1);
  const ParallelGroups& g = o.groups ? *o.groups : single;
  const TraceIdentity id = trace_identity(g, "bench");
  g.world_comm->barrier();  // the ranks' trace clocks start together
  const bool root = g.is_replica_root();
  TraceRecorder trace(id);
  if (!o.trace_dir.empty()) {
    trace.open(o.trace_dir);
    trace.set_attribute("config_yaml", run_config_to_yaml(cfg));
    trace.set_attribute("plan", nlohmann::json{{"batch_sizes", o.batch_sizes},
                                               {"input_len", o.input_len},
                                               {"output_len", o.output_len},
                                               {"seed", o.seed},
                                               {"random_weights", o.random_weights},
                                               {"model", o.model_dir.string()}}
                                    .dump(2));
  }
  ModelConfig mc;
  if (o.random_weights && !std::filesystem::is_directory(o.model_dir)) {
    mc = preset_config(o.model_dir.string(), o.layers);
    // A slice of N layers keeps one dense layer and makes the rest MoE (R1 has 3 dense of 61):
    // what a decode step spends its time on.
    if (o.layers > 0 && mc.n_routed_experts > 0) mc.first_k_dense_replace = std::min<int64_t>(mc.first_k_dense_replace, 1);
  } else {
    mc = load_model_config(o.model_dir);
    if (o.layers > 0) {
      DILU_USER_CHECK(o.random_weights, "--layers needs --random-weights (a checkpoint has its own layers)");
      mc.num_hidden_layers = o.layers;
    }
  }
  BackendOptions bo;
  bo.cpu_threads = cfg.cpu.threads;
  bo.fp8_gemm = cfg.cuda.fp8_gemm;
  bo.kernels = cfg.cuda.kernels;
  bo.graphs = cfg.cuda.graphs;
  const int64_t largest_batch = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  bo.arena_bytes = DeepseekV3::step_scratch_bytes(mc, std::max<int64_t>(cfg.batch.max_tokens, largest_batch),
                                                  largest_batch, g.tp);
  std::unique_ptr<Ops> ops = make_ops(cfg.backend, bo);
  // Tensor and pipeline parallel: NCCL on GPUs, MPI on the CPU, timed for the trace as in a run.
  DeviceComms device_comms = make_device_comms(g, *ops, cfg);
  TracedCommunicator tp_traced(*device_comms.tp, trace, TraceGroup::TP);
  TracedCommunicator pp_traced(*device_comms.pp, trace, TraceGroup::PP);
  TracedCommunicator replica_traced(*g.replica_comm, trace, TraceGroup::Replica);
  const std::vector<std::pair<int64_t, int64_t>> stages = stage_ranges(mc, cfg, g.tp, g.pp);
  const auto [first_layer, end_layer] = stages[static_cast<size_t>(g.pp_rank)];
  trace.set_device(ops->device().kind == DeviceKind::CPU ? ops->name() : ops->name() + " [" + ops->device().str() + "]");
  trace.set_memory_probe(device_memory_probe(*ops, bo.arena_bytes));
  const Checkpoint ckpt = o.random_weights ? Checkpoint::synthetic(mc, *ops, o.seed) : Checkpoint::open(o.model_dir);
  const auto t_place = std::chrono::steady_clock::now();
  DeepseekV3 model(mc, ckpt, *ops, TensorParallel{g.tp_rank, g.tp, g.tp > 1 ? &tp_traced : nullptr},
                   PipelineStage{first_layer, end_layer});
  // Before the KV cache takes its memory: the scratch of the decode steps' graphs.
  const bool graphs = model.enable_graphs(largest_batch);
  ops->synchronize();
  if (root)
    log << "dilu bench: " << mc.num_hidden_layers << " layers, " << model.weight_bytes() / (1 << 20)
        << " MiB of weights on this rank" << (o.random_weights ? " made on the device" : " placed") << " in "
        << std::chrono::duration<double>(std::chrono::steady_clock::now() - t_place).count() << " s on "
        << ops->name() << "\n";
  if (root && ops->device().kind == DeviceKind::CUDA)
    log << "dilu bench: decode steps " << (graphs ? "captured as CUDA graphs and replayed" : "launched kernel by kernel")
        << " (cuda.graphs" << (cfg.cuda.graphs ? "" : "=false") << ")\n";
  if (root && g.pp > 1) {
    log << "dilu bench: pipeline stages:";
    for (const auto& [a, b] : stages) log << " [" << a << ", " << b << ")";
    log << ", " << g.pp << " micro-batches per step\n";
  }
  // MoE layers of this rank's stage, of the model: the root counts the experts its own stage
  // and TP shard selected.
  int64_t moe_here = 0, moe_all = 0;
  for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
    moe_all += mc.is_moe_layer(l);
    if (l >= first_layer && l < end_layer) moe_here += mc.is_moe_layer(l);
  }
  const double routed_scale =
      moe_here > 0 ? static_cast<double>(g.tp) * static_cast<double>(moe_all) / static_cast<double>(moe_here) : 0.0;
  const double gpus = static_cast<double>(g.tp * g.pp);
  const ModelCosts costs = model_costs(mc);
  const double bandwidth = ops->measure_copy_bandwidth(size_t{1} << 30);
  if (root) log << "dilu bench: device copy bandwidth " << bandwidth / 1e9 << " GB/s (read + write of 1 GiB)\n";
  const double gemm_peak = root && ops->device().kind == DeviceKind::CUDA
                               ? measure_gemm_peak(*ops, mc, std::min<int64_t>(cfg.batch.max_tokens, 4096), log)
                               : 0.0;
  // Tensor parallel: the all-reduce a layer does twice (after attention, after the MLP), on the
  // step's hidden states at each batch size, timed on its own (every TP rank takes part).
  std::map<int64_t, double> all_reduce_s;
  if (g.tp > 1) {
    for (int64_t batch : o.batch_sizes) {
      Tensor h = ops->random_fill(ops->activation_dtype(), {batch, mc.hidden_size}, 0xa11 + static_cast<uint64_t>(batch),
                                  0.0f, 1.0f);
      device_comms.tp->all_reduce_sum(h);  // warm-up
      ops->synchronize();
      device_comms.tp->barrier();
      constexpr int kReps = 20;
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < kReps; ++r) device_comms.tp->all_reduce_sum(h);
      ops->synchronize();
      all_reduce_s[batch] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kReps;
      if (root)
        log << "dilu bench: all-reduce of [" << batch << " x " << mc.hidden_size << "] "
            << dtype_name(ops->activation_dtype()) << " over tp " << g.tp << ": " << 1e6 * all_reduce_s[batch]
            << " us (" << 2e3 * all_reduce_s[batch] * static_cast<double>(mc.num_hidden_layers)
            << " ms per step at 2 per layer)\n";
    }
  }
  const int64_t seq_len = o.input_len + o.output_len;
  DILU_USER_CHECK(o.input_len >= 1 && o.output_len >= 1, "--input-len and --output-len must be at least 1");
  DILU_USER_CHECK(seq_len <= mc.max_position_embeddings, "--input-len + --output-len = ", seq_len,
                  " exceeds the model's max_position_embeddings ", mc.max_position_embeddings);
  const int64_t bs = cfg.kv.block_size;
  const int64_t largest = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  // The cache holds every sequence of the largest batch at full length: no preemption in the
  // measurement.
  const int64_t num_blocks = (seq_len + bs - 1) / bs * largest;
  KvCache cache(*ops, model.num_stage_layers(), num_blocks, bs, mc.kv_lora_rank + mc.qk_rope_head_dim);
  ReplicaComms comms;
  comms.replica = &replica_traced;
  comms.pp = &pp_traced;
  comms.pp_size = g.pp;
  comms.pp_rank = g.pp_rank;
  comms.tp_rank = g.tp_rank;
  trace.set_kv_blocks_total(num_blocks);
  trace.span(SpanKind::Load, 0.0, trace.clock().now());
  int64_t requests_done = 0, prompt_tokens = 0, output_tokens = 0;
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(mc.vocab_size - 1));

  // `batch` requests of random prompts, greedy, each generating exactly `output_len` tokens.
  auto submit_batch = [&](Engine& engine, int64_t batch, int64_t output_len) {
    for (int64_t i = 0; i < batch; ++i) {
      EngineRequest r;
      r.handle = i;
      for (int64_t t = 0; t < o.input_len; ++t) r.prompt.push_back(token(rng));
      r.sampling.temperature = 0;
      r.sampling.max_tokens = output_len;
      r.sampling.ignore_eos = true;
      engine.submit(std::move(r));
    }
  };

  std::vector<BenchRow> rows;
  for (int64_t batch : o.batch_sizes) {
    EngineOptions eo;
    eo.limits = {batch, std::max<int64_t>(cfg.batch.max_tokens, batch), bs};
    eo.max_seq_len = seq_len;
    if (o.warmup) {  // untimed and unrecorded (BenchOptions::warmup)
      if (!root) {
        follow_steps(model, *ops, cache, comms, nullptr);
      } else {
        Engine warm(model, *ops, cache, eo, nullptr, comms);
        submit_batch(warm, batch, std::min<int64_t>(o.output_len, 3));
        while (!warm.idle()) warm.step();
        warm.stop_followers();
        ops->take_routed_expert_count();
      }
    }
    if (!root) {  // this replica's root schedules; the others run their share of its steps
      follow_steps(model, *ops, cache, comms, &trace);
      continue;
    }
    Engine engine(model, *ops, cache, eo, nullptr, comms);
    engine.set_trace(&trace);
    const int64_t first_step = trace.steps();
    submit_batch(engine, batch, o.output_len);
    BenchRow row;
    row.batch = batch;
    row.bandwidth_bytes_s = bandwidth;
    row.gemm_peak_flops = gemm_peak;
    ops->take_routed_expert_count();
    int64_t routed = 0;
    double routed_scaled = 0;
    while (!engine.idle()) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::vector<EngineResult> done = engine.step();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const EngineResult& res : done) {
        const int64_t out = static_cast<int64_t>(res.samples.front().token_ids.size());
        ++requests_done;
        prompt_tokens += res.prompt_tokens;
        output_tokens += out;
        if (!trace.recording()) continue;
        const TraceClock& tc = trace.clock();
        trace.record_request({"b" + std::to_string(batch) + "-" + std::to_string(res.handle), res.handle + 1,
                              res.prompt_tokens, out, 1, tc.at(res.submitted), tc.at(res.first_token), tc.now(),
                              id.dp_rank});
      }
      const StepStats& st = engine.last_step();
      const int64_t step_routed = ops->take_routed_expert_count();
      if (st.prefill_tokens > 0) {
        row.prefill_seconds += dt;
        row.prefill_tokens += st.prefill_tokens;
      } else {
        row.decode_seconds += dt;
        row.decode_tokens += st.decode_tokens;
        ++row.decode_steps;
        routed += step_routed;
        // Each sequence attends to its whole context: prompt plus what it generated so far.
        const double ctx = static_cast<double>(o.input_len + row.decode_steps);
        // With several GPUs: the root counted its own shard and stage's experts (scaled to the
        // model's), and the ideal step reads all bytes split evenly over the GPUs at once.
        const double experts = g.tp * g.pp > 1 ? static_cast<double>(step_routed) * routed_scale
                                               : static_cast<double>(step_routed);
        const double bytes = costs.fixed_bytes + experts * costs.expert_bytes +
                             static_cast<double>(st.decode_tokens) * ctx * costs.kv_bytes_per_token +
                             static_cast<double>(st.decode_tokens * mc.hidden_size) * 2.0;
        row.decode_roofline_seconds += bytes / (bandwidth * gpus);
        routed_scaled += experts;
      }
    }
    (void)routed;
    row.routed_experts_per_step = routed_scaled / static_cast<double>(std::max<int64_t>(row.decode_steps, 1));
    row.gpus = g.tp * g.pp;
    row.layers = mc.num_hidden_layers;
    if (auto it = all_reduce_s.find(batch); it != all_reduce_s.end()) row.all_reduce_seconds = it->second;
    // Prefill: every prompt token through the linears, one logits row per sequence (the first
    // generated token), attention over the causal prefix.
    const double b = static_cast<double>(batch), s_len = static_cast<double>(o.input_len);
    row.prefill_flops = 2.0 * (b * s_len * costs.params_per_token + b * costs.head_params +
                               b * s_len * (s_len + 1) / 2 * costs.attn_per_ctx);
    log << "dilu bench: batch " << batch << " done: prefill " << row.prefill_tok_s() << " tok/s ("
        << row.prefill_flops_s() / 1e12 << " TFLOP/s), decode " << row.decode_tok_s() << " tok/s, "
        << row.ms_per_decode_step() << " ms/step against a roofline of "
        << 1e3 * row.decode_roofline_seconds / static_cast<double>(std::max<int64_t>(row.decode_steps, 1))
        << " ms (" << row.decode_roofline_ratio() << "x), " << row.routed_experts_per_step << " experts/step\n";
    trace.record_bench({batch, first_step, trace.steps(), row.prefill_seconds, row.decode_seconds, row.prefill_tokens,
                        row.decode_tokens, row.decode_steps});
    rows.push_back(row);
    engine.stop_followers();
  }
  const TraceTotals totals = trace.totals();
  const double step_seconds = std::max(totals.compute_s + totals.comm_s + totals.host_s, 1e-12);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  finish_trace(trace, *g.world_comm, o.trace_dir,
               {{"wall_s", wall},
                {"requests_done", static_cast<double>(requests_done)},
                {"prompt_tokens", static_cast<double>(prompt_tokens)},
                {"completion_tokens", static_cast<double>(output_tokens)}});
  if (!o.trace_dir.empty() && root)
    log << "dilu bench: trace recording took " << 1e6 * totals.recording_s / static_cast<double>(std::max<int64_t>(totals.steps, 1))
        << " us per step, " << 100 * totals.recording_s / step_seconds << "% of the step time (" << totals.steps
        << " steps; closing the files took " << 1e3 * trace.file_closing_seconds() << " ms once); traces in "
        << o.trace_dir.string() << "\n";
  return rows;
}

}  // namespace dilu
