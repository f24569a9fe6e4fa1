// The run loop: reads input lines lazily as the engine has room, encodes and submits them,
// steps the engine, and appends each finished request's record as soon as it is done (output
// order is completion order; every input line gets exactly one record).
#include "engine/run_job.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <random>
#include <set>
#include <sstream>

#include "engine/deepseek_v3.h"
#include "engine/engine.h"
#include "engine/jsonl_writer.h"
#include "engine/kv_cache.h"
#include "engine/output_record.h"
#include "engine/output_resume.h"
#include "engine/prompt_encoder.h"
#include "engine/request.h"
#include "engine/planner.h"
#include "engine/safetensors.h"
#include "engine/trace.h"
#ifdef DILU_HAVE_CUDA
#include "parallel/nccl_communicator.h"
#endif

namespace dilu {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Lines of a file small enough to count in passing (for the progress line's total).
int64_t count_lines(const std::filesystem::path& p) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(p, ec);
  if (ec || size > (1ull << 30)) return -1;
  std::ifstream in(p, std::ios::binary);
  return std::count(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), '\n');
}

// KV-cache blocks: kv.num_blocks, else what kv.memory_fraction of free memory holds, at most
// enough for batch.max_seqs sequences of model.max_seq_len tokens.
int64_t cache_blocks(const RunConfig& cfg, const ModelConfig& mc, const Ops& ops, int64_t max_seq_len,
                     int64_t* block_bytes) {
  const int64_t bs = cfg.kv.block_size;
  *block_bytes = (mc.kv_lora_rank + mc.qk_rope_head_dim) * static_cast<int64_t>(dtype_size(ops.cache_dtype())) *
                 bs * mc.num_hidden_layers;
  if (cfg.kv.num_blocks > 0) return cfg.kv.num_blocks;
  const auto budget = static_cast<int64_t>(cfg.kv.memory_fraction * static_cast<double>(ops.free_memory_bytes()));
  return std::min<int64_t>(budget / *block_bytes, (max_seq_len + bs - 1) / bs * cfg.batch.max_seqs);
}

}  // namespace

TraceIdentity trace_identity(const ParallelGroups& g, const std::string& command) {
  TraceIdentity id;
  id.command = command;
  id.world_rank = g.world.rank;
  id.world_size = g.world.size;
  id.node = g.world.node;
  id.num_nodes = g.world.num_nodes;
  id.local_rank = g.world.local_rank;
  id.tp = g.tp;
  id.pp = g.pp;
  id.dp = g.dp;
  id.tp_rank = g.tp_rank;
  id.pp_rank = g.pp_rank;
  id.dp_rank = g.dp_rank;
  id.hostname = g.world.hostname.empty() ? this_hostname() : g.world.hostname;
  return id;
}

std::vector<std::pair<int64_t, int64_t>> stage_ranges(const ModelConfig& mc, const RunConfig& cfg, int tp, int pp) {
  std::vector<std::pair<int64_t, int64_t>> stages;
  for (int64_t count : stage_layer_counts(mc, cfg, tp, pp)) {
    const int64_t first = stages.empty() ? 0 : stages.back().second;
    stages.push_back({first, first + count});
  }
  return stages;
}

DeviceComms make_device_comms(const ParallelGroups& g, Ops& ops, const RunConfig& cfg) {
  DeviceComms d;
  d.tp = g.tp_comm.get();
  d.pp = g.pp_comm.get();
  if (ops.device().kind == DeviceKind::CUDA && (g.tp > 1 || g.pp > 1)) {
#ifdef DILU_HAVE_CUDA
    NcclOptions no;
    no.timeout_s = cfg.cuda.nccl_timeout_s;
    if (g.tp > 1) d.tp = (d.tp_nccl = make_nccl_communicator(*g.tp_comm, ops.native_stream(), no)).get();
    if (g.pp > 1) d.pp = (d.pp_nccl = make_nccl_communicator(*g.pp_comm, ops.native_stream(), no)).get();
    ops.add_wait_check([] { nccl_check_async_errors(); });
#else
    (void)cfg;
#endif
  }
  return d;
}

namespace {

// Everything a rank builds before the first step. Built inside agree_or_fail() so that a
// failure on any rank ends every rank together, with one message.
struct Loaded {
  ModelConfig mc;
  std::ifstream in;
  std::unique_ptr<PromptEncoder> encoder;
  std::optional<Checkpoint> ckpt;
  std::unique_ptr<Ops> ops;
  DeviceComms device_comms;
  std::unique_ptr<Communicator> tp_traced, pp_traced;  // the two above, timed for the trace
  Communicator* tp_comm = nullptr;
  Communicator* pp_comm = nullptr;
  std::vector<std::pair<int64_t, int64_t>> stages;  // [first, end) layers of each stage
  nlohmann::json planner;                           // the planner's plan (GPUs), or null
  std::unique_ptr<DeepseekV3> model;
  std::unique_ptr<KvCache> cache;
  RequestLimits limits;
  EngineOptions eo;
  int64_t num_blocks = 0;
  int64_t block_bytes = 0;
  ResumeState resume;
  std::optional<JsonlWriter> writer;
};

// Runs `fn` on every rank, then agrees: if it threw anywhere, the lowest failing rank's message
// is sent to all, rank 0 throws it as a UserError (printed once) and the others throw
// SilentFailure. Nobody is left waiting in a collective.
template <class Fn>
void agree_or_fail(Communicator& world, Fn&& fn) {
  std::string error;
  bool user_error = true;
  try {
    fn();
  } catch (const UserError& e) {
    error = e.what();
  } catch (const std::exception& e) {
    error = e.what();
    user_error = false;
  }
  const int64_t me = world.rank();
  if (world.sum(error.empty() ? 0 : 1) == 0) return;
  // The lowest failing rank speaks for all (one small collective per rank it has to pass).
  int64_t lowest = world.size();
  for (int64_t r = 0; r < world.size() && lowest == world.size(); ++r)
    if (world.sum(r == me && !error.empty() ? 1 : 0) > 0) lowest = r;
  std::vector<uint8_t> bytes(error.begin(), error.end());
  bytes.push_back(user_error ? 1 : 0);
  world.broadcast(bytes, static_cast<int>(lowest));
  const bool was_user = bytes.back() == 1;
  const std::string message(bytes.begin(), bytes.end() - 1);
  if (me != 0) throw SilentFailure();
  const std::string where = lowest == 0 || world.size() == 1 ? "" : "rank " + std::to_string(lowest) + ": ";
  throw AgreedFailure(where + (was_user ? "" : "internal error: ") + message);
}


}  // namespace

RunSummary run_job(const RunJobOptions& o, const RunConfig& cfg, std::ostream& log) {
  RunSummary s;
  const auto t_load = Clock::now();
  ParallelGroups single;
  if (!o.groups) single = make_parallel_groups(World{}, 1, 1, 1);
  const ParallelGroups& g = o.groups ? *o.groups : single;
  // The trace clock starts as every rank leaves this barrier: the ranks' times line up.
  g.world_comm->barrier();
  TraceRecorder trace(trace_identity(g, "run"));

  Loaded L;
  agree_or_fail(*g.world_comm, [&] {
    if (!o.trace_dir.empty()) {
      trace.open(o.trace_dir);
      trace.set_attribute("config_yaml", run_config_to_yaml(cfg));
    }
    DILU_USER_CHECK(cfg.parallel.ep == 0 || cfg.parallel.ep == g.tp, "parallel.ep = ", cfg.parallel.ep,
                    ": experts are placed over the tensor-parallel ranks (ep = tp); other splits are not implemented "
                    "yet: leave parallel.ep at 0");
    L.mc = load_model_config(o.model_dir);
    L.in.open(o.input);
    DILU_USER_CHECK(L.in.good(), "cannot read input file '", o.input.string(), "'");
    // Records of replicas that an earlier run left in part files join the output first, so
    // that resuming works whatever the data-parallel size was.
    if (g.world.rank == 0) {
      if (o.overwrite) {
        std::error_code ec;
        std::filesystem::remove(o.output, ec);
      }
      merge_part_files(o.output);
      // Several replicas read the output next: cut a torn last line once, here, not in each.
      if (g.dp > 1 && o.resume && !o.overwrite) load_resume_state(o.output);
    }
    L.encoder = std::make_unique<PromptEncoder>(o.model_dir);
    L.ckpt.emplace(Checkpoint::open(o.model_dir));
    BackendOptions bo;
    bo.cpu_threads = cfg.cpu.threads;
    bo.fp8_gemm = cfg.cuda.fp8_gemm;
    bo.kernels = cfg.cuda.kernels;
    bo.graphs = cfg.cuda.graphs;
    bo.arena_bytes = DeepseekV3::step_scratch_bytes(L.mc, cfg.batch.max_tokens, cfg.batch.max_seqs, g.tp);
    L.ops = make_ops(cfg.backend, bo);
    trace.set_device(L.ops->device().kind == DeviceKind::CPU ? L.ops->name()
                                                             : L.ops->name() + " [" + L.ops->device().str() + "]");
    trace.set_memory_probe(device_memory_probe(*L.ops, bo.arena_bytes));
    // On GPUs the tensors of TP collectives and pipeline sends live on the device: NCCL carries
    // them, over the same groups (host bytes still go over MPI).
    L.device_comms = make_device_comms(g, *L.ops, cfg);
    L.tp_comm = L.device_comms.tp;
    L.pp_comm = L.device_comms.pp;
    L.tp_traced = std::make_unique<TracedCommunicator>(*L.tp_comm, trace, TraceGroup::TP);
    L.pp_traced = std::make_unique<TracedCommunicator>(*L.pp_comm, trace, TraceGroup::PP);
    L.tp_comm = L.tp_traced.get();
    L.pp_comm = L.pp_traced.get();
    if (L.ops->device().kind == DeviceKind::CUDA) {
      // Out of memory is told before any weight moves, in the planner's numbers: this layout on
      // GPUs with the memory this one has free now.
      ClusterShape cluster;
      cluster.nodes = 1;
      cluster.gpus_per_node = g.world.size;
      cluster.gpu.memory_bytes = L.ops->free_memory_bytes() + static_cast<uint64_t>(bo.arena_bytes);
      cluster.gpu.name = "this GPU (" + human_bytes(cluster.gpu.memory_bytes) + " free)";
      PlanOptions po;
      po.tp = g.tp;
      po.pp = g.pp;
      po.dp = g.dp;
      po.suggest = false;
      const Plan plan = plan_layout(L.mc, cluster, cfg, po);
      DILU_USER_CHECK(plan.feasible, plan.refusal_message());
      L.planner = plan_to_json(plan, o.model_dir.filename().string());
    }
    L.stages = stage_ranges(L.mc, cfg, g.tp, g.pp);
    const std::vector<std::pair<int64_t, int64_t>>& stages = L.stages;
    const auto [first_layer, end_layer] = stages[static_cast<size_t>(g.pp_rank)];
    L.model = std::make_unique<DeepseekV3>(L.mc, *L.ckpt, *L.ops, TensorParallel{g.tp_rank, g.tp, L.tp_comm},
                                           PipelineStage{first_layer, end_layer});
    // Before the KV cache is sized from the free memory: the scratch of the decode steps' graphs.
    L.model->enable_graphs(cfg.batch.max_seqs);
    if (g.world.rank == 0 && g.pp > 1) {
      log << "dilu: pipeline stages:";
      for (const auto& [a, b] : stages) log << " [" << a << ", " << b << ")";
      log << "\n";
    }
    L.limits = request_limits(L.mc, cfg);
    L.num_blocks = cache_blocks(cfg, L.mc, *L.ops, L.limits.max_seq_len, &L.block_bytes);
    DILU_USER_CHECK(L.num_blocks >= 1, "the KV cache gets no block: ", L.block_bytes, " bytes per block of ",
                    cfg.kv.block_size, " tokens do not fit; lower kv.block_size or raise kv.memory_fraction");
    L.cache = std::make_unique<KvCache>(*L.ops, L.model->num_stage_layers(), L.num_blocks, cfg.kv.block_size,
                                        L.mc.kv_lora_rank + L.mc.qk_rope_head_dim);
    L.eo.limits = {cfg.batch.max_seqs, cfg.batch.max_tokens, cfg.kv.block_size};
    L.eo.max_seq_len = L.limits.max_seq_len;
    for (int64_t e : L.mc.eos_token_ids) L.eo.eos_token_ids.push_back(static_cast<int32_t>(e));
  });
  agree_or_fail(*g.world_comm, [&] {
    if (!g.is_replica_root()) return;
    // Resume: what an earlier run answered is skipped.
    if (o.resume && !o.overwrite) L.resume = load_resume_state(o.output);
    // One replica writes the output itself; several write part files merged at the end.
    const std::filesystem::path out_path = g.dp == 1 ? o.output : part_file(o.output, g.dp_rank, g.dp);
    if (g.dp > 1 && !o.resume) {
      std::error_code ec;
      DILU_USER_CHECK(!std::filesystem::is_regular_file(o.output, ec) || std::filesystem::file_size(o.output, ec) == 0,
                      "output file '", o.output.string(), "' already exists and is not empty (--no-resume)");
    }
    L.writer.emplace(out_path, o.overwrite ? JsonlWriter::Mode::Overwrite
                                           : (o.resume || g.dp > 1 ? JsonlWriter::Mode::Append
                                                                   : JsonlWriter::Mode::Create));
  });
  s.load_seconds = seconds_since(t_load);
  s.weight_bytes = L.model->weight_bytes();
  trace.span(SpanKind::Load, 0.0, trace.clock().now());
  trace.set_kv_blocks_total(L.num_blocks);
  if (trace.recording()) {
    nlohmann::json plan = {{"tp", g.tp},
                           {"pp", g.pp},
                           {"dp", g.dp},
                           {"stages", L.stages},
                           {"micro_batches", g.pp},
                           {"kv_blocks", L.num_blocks},
                           {"kv_block_size", cfg.kv.block_size},
                           {"kv_block_bytes", L.block_bytes},
                           {"weight_bytes", s.weight_bytes},
                           {"planner", L.planner}};
    trace.set_attribute("plan", plan.dump(2));
  }
  TracedCommunicator replica_traced(*g.replica_comm, trace, TraceGroup::Replica);
  // Each rank closes its trace and rank 0 gathers every rank's load (and writes the timeline).
  auto end_trace = [&] {
    s.wall_seconds = seconds_since(t_load);
    const std::map<std::string, double> summary = {
        {"wall_s", s.wall_seconds},
        {"load_s", s.load_seconds},
        {"generate_s", s.generate_seconds},
        {"requests_done", static_cast<double>(s.requests_done)},
        {"requests_failed", static_cast<double>(s.requests_failed)},
        {"requests_skipped", static_cast<double>(s.requests_skipped)},
        {"prompt_tokens", static_cast<double>(s.prompt_tokens)},
        {"completion_tokens", static_cast<double>(s.completion_tokens)},
        {"preemptions", static_cast<double>(s.preemptions)},
        {"interrupted", s.interrupted ? 1.0 : 0.0}};
    s.ranks = finish_trace(trace, *g.world_comm, o.trace_dir, summary);
  };
  ReplicaComms comms;
  comms.replica = &replica_traced;
  comms.pp = L.pp_comm;
  comms.pp_size = g.pp;
  comms.pp_rank = g.pp_rank;
  comms.tp_rank = g.tp_rank;
  if (!g.is_replica_root()) {
    const auto t_gen = Clock::now();
    follow_steps(*L.model, *L.ops, *L.cache, comms, &trace);
    s.generate_seconds = seconds_since(t_gen);
    g.world_comm->barrier();
    g.world_comm->barrier();
    end_trace();
    return s;
  }
  std::ifstream& in = L.in;
  const PromptEncoder& encoder = *L.encoder;
  Ops* ops = L.ops.get();
  const RequestLimits& limits = L.limits;
  ResumeState& resume = L.resume;
  JsonlWriter& writer = *L.writer;
  Engine engine(*L.model, *ops, *L.cache, L.eo, encoder.tokenizer(), comms);
  engine.set_trace(&trace);
  log << "dilu: model loaded in " << std::fixed << std::setprecision(2) << s.load_seconds << " s on " << ops->name()
      << "; tokenizer " << (encoder.tokenizer() ? "loaded" : "absent (token ids only)") << "; chat template "
      << (encoder.chat_template() ? encoder.chat_template()->name() : std::string("none")) << "; KV cache "
      << L.num_blocks << " blocks of " << cfg.kv.block_size << " tokens (" << (L.num_blocks * L.block_bytes >> 20)
      << " MiB)\n";
  if (resume.records > 0)
    log << "dilu: resuming: " << o.output.string() << " holds " << resume.records
        << " records; their input lines are skipped\n";

  RecordContext ctx;
  ctx.model_name = o.model_dir.filename().empty() ? o.model_dir.parent_path().filename().string()
                                                  : o.model_dir.filename().string();
  ctx.run_nonce = std::random_device{}() ^ (static_cast<uint64_t>(std::random_device{}()) << 32);
  ctx.with_token_ids = cfg.output.token_ids;
  const bool opens_reasoning = encoder.chat_template() && encoder.chat_template()->opens_reasoning();

  auto fail = [&](const RequestError& e) {
    writer.write(error_record(e, ctx));
    ++s.requests_failed;
    log << "dilu: " << e.message << "\n";
  };

  std::map<int64_t, Request> in_flight;  // by handle (= input line)
  std::set<std::string> seen_ids;        // ids of this run, for duplicate detection
  const int64_t total_lines = count_lines(o.input) / g.dp;
  const int64_t admit_ahead = 2 * static_cast<int64_t>(cfg.batch.max_seqs);
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  std::string text;
  int64_t line = 0;
  bool input_done = false;
  const auto t_gen = Clock::now();
  auto last_progress = Clock::now();
  auto stopping = [&] { return o.stop && o.stop->load(); };

  for (;;) {
    // Keep the engine fed: read lines until enough requests wait for room.
    while (!input_done && !stopping() && engine.num_requests() < admit_ahead) {
      if (!std::getline(in, text)) {
        DILU_USER_CHECK(!in.bad(), "error reading input file '", o.input.string(), "' after line ", line);
        input_done = true;
        break;
      }
      ++line;
      if ((line - 1) % g.dp != g.dp_rank) continue;  // another replica's line
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are not requests
      if (resume.done_lines.count(line)) {
        ++s.requests_skipped;
        continue;
      }
      auto parsed = parse_request(text, line, limits);
      if (auto* err = std::get_if<RequestError>(&parsed)) {
        fail(*err);  // not in done_lines: its error record was never written
        continue;
      }
      Request& r = std::get<Request>(parsed);
      const std::string key = r.id.dump();
      const bool first = seen_ids.insert(key).second;
      if (first && take_done(resume, key)) {  // answered by an earlier run
        ++s.requests_skipped;
        continue;
      }
      if (!first) {
        fail(request_error(r, is_openai_batch(r.format) ? "custom_id" : "id",
                           "duplicate id " + key + ": an earlier line has it; ids must be unique"));
        continue;
      }
      EngineRequest er;
      try {
        er.prompt = encoder.encode(r);
      } catch (const UserError& e) {
        fail(request_error(r, r.kind == RequestKind::Chat ? "messages" : "prompt", e.what()));
        continue;
      }
      if (er.prompt.empty()) {
        fail(request_error(r, "prompt", "the prompt encodes to no tokens"));
        continue;
      }
      if (static_cast<int64_t>(er.prompt.size()) > limits.max_seq_len) {
        fail(request_error(r, "prompt", "prompt of " + std::to_string(er.prompt.size()) +
                                            " tokens is longer than model.max_seq_len = " +
                                            std::to_string(limits.max_seq_len)));
        continue;
      }
      if (!r.sampling.stop.empty() && !encoder.tokenizer()) {
        fail(request_error(r, "stop", "stop strings need the model's tokenizer (tokenizer.json)"));
        continue;
      }
      er.handle = line;
      er.sampling = r.sampling;
      er.seed = request_seed(r, cfg.sampling.seed);
      if (engine.blocks_needed(er) > engine.num_blocks()) {
        fail(request_error(r, "max_tokens",
                           "prompt plus max_tokens needs " + std::to_string(engine.blocks_needed(er)) +
                               " KV-cache blocks but the cache has " + std::to_string(engine.num_blocks()) +
                               "; lower max_tokens, or give the cache more room (kv.num_blocks, kv.memory_fraction)"));
        continue;
      }
      in_flight.emplace(line, std::move(r));
      engine.submit(std::move(er));
    }
    if (stopping()) {
      s.interrupted = !engine.idle() || !input_done;
      break;
    }
    if (engine.idle()) {
      if (input_done) break;
      continue;
    }

    for (EngineResult& res : engine.step()) {
      auto it = in_flight.find(res.handle);
      DILU_CHECK(it != in_flight.end(), "result for unknown request ", res.handle);
      const Request& r = it->second;
      if (cfg.output.split_reasoning) {
        for (SampleOutput& so : res.samples) {
          ReasoningSplit split = split_reasoning(so.text, r.kind == RequestKind::Chat && opens_reasoning);
          so.reasoning_content = std::move(split.reasoning);
          so.text = std::move(split.content);
        }
      }
      writer.write(output_record(r, res.samples, res.prompt_tokens, ctx));
      ++s.requests_done;
      s.prompt_tokens += res.prompt_tokens;
      int64_t output_tokens = 0;
      for (const SampleOutput& so : res.samples) output_tokens += static_cast<int64_t>(so.token_ids.size());
      s.completion_tokens += output_tokens;
      if (trace.recording()) {
        const TraceClock& tc = trace.clock();
        trace.record_request({r.id.is_string() ? r.id.get<std::string>() : r.id.dump(), r.line, res.prompt_tokens,
                              output_tokens, static_cast<int64_t>(res.samples.size()), tc.at(res.submitted),
                              tc.at(res.first_token), tc.now(), g.dp_rank});
      }
      in_flight.erase(it);
    }
    ++s.steps;

    if (seconds_since(last_progress) > (tty ? 0.5 : 30.0)) {
      last_progress = Clock::now();
      const double t = std::max(seconds_since(t_gen), 1e-9);
      const int64_t answered = s.requests_done + s.requests_failed + s.requests_skipped;
      std::ostringstream msg;
      msg << std::fixed << std::setprecision(1) << "dilu: " << answered << "/"
          << (total_lines >= 0 ? std::to_string(total_lines) : std::string("?")) << " lines answered, "
          << engine.num_requests() << " in flight, " << s.completion_tokens / t << " tok/s out";
      if (total_lines > 0 && answered > s.requests_skipped) {
        const double rate = static_cast<double>(answered - s.requests_skipped) / t;
        msg << ", ETA " << static_cast<int64_t>(static_cast<double>(total_lines - answered) / rate) << " s";
      }
      if (tty) log << "\r" << msg.str() << "\x1b[K" << std::flush;
      else log << msg.str() << "\n";
    }
  }
  if (tty) log << "\n";
  engine.stop_followers();
  writer.sync();
  L.writer.reset();
  s.preemptions = engine.num_preemptions();
  s.generate_seconds = seconds_since(t_gen);
  g.world_comm->barrier();  // every replica has written its records
  if (g.world.rank == 0 && g.dp > 1) merge_part_files(o.output);
  g.world_comm->barrier();
  end_trace();
  return s;
}

}  // namespace dilu
