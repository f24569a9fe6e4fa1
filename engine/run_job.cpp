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

#include "engine/deepseek_v3.h"
#include "engine/engine.h"
#include "engine/jsonl_writer.h"
#include "engine/kv_cache.h"
#include "engine/output_record.h"
#include "engine/output_resume.h"
#include "engine/prompt_encoder.h"
#include "engine/request.h"
#include "engine/safetensors.h"

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
  *block_bytes = (mc.kv_lora_rank + mc.qk_rope_head_dim) * static_cast<int64_t>(dtype_size(ops.activation_dtype())) *
                 bs * mc.num_hidden_layers;
  if (cfg.kv.num_blocks > 0) return cfg.kv.num_blocks;
  const auto budget = static_cast<int64_t>(cfg.kv.memory_fraction * static_cast<double>(ops.free_memory_bytes()));
  return std::min<int64_t>(budget / *block_bytes, (max_seq_len + bs - 1) / bs * cfg.batch.max_seqs);
}

}  // namespace

RunSummary run_job(const RunJobOptions& o, const RunConfig& cfg, std::ostream& log) {
  RunSummary s;
  const auto t_load = Clock::now();
  ParallelGroups single;
  if (!o.groups) {
    single = make_parallel_groups(World{}, 1, 1, 1);
  }
  const ParallelGroups& g = o.groups ? *o.groups : single;
  DILU_USER_CHECK(g.pp == 1, "parallel.pp = ", g.pp, ": pipeline parallelism is not implemented yet; use parallel.tp "
                  "and parallel.dp");
  const ModelConfig mc = load_model_config(o.model_dir);
  std::ifstream in(o.input);
  DILU_USER_CHECK(in.good(), "cannot read input file '", o.input.string(), "'");

  // Records of replicas that an earlier run left in part files join the output first, so that
  // resuming works whatever the data-parallel size was.
  std::string merge_error;
  if (g.world.rank == 0) {
    try {
      if (o.overwrite) {
        std::error_code ec;
        std::filesystem::remove(o.output, ec);
        for (int r = 0; r < 64; ++r) {
          std::filesystem::remove(part_file(o.output, r, g.dp), ec);
        }
      }
      merge_part_files(o.output);
      if (o.resume && !o.overwrite) load_resume_state(o.output);  // cuts a torn last line, once
    } catch (const UserError& e) {
      merge_error = e.what();
    }
  }
  g.world_comm->barrier();
  DILU_USER_CHECK(merge_error.empty(), merge_error);

  const PromptEncoder encoder(o.model_dir);
  const Checkpoint ckpt = Checkpoint::open(o.model_dir);
  std::unique_ptr<Ops> ops = make_ops(cfg.backend, cfg.cpu.threads);
  DeepseekV3 model(mc, ckpt, *ops, TensorParallel{g.tp_rank, g.tp, g.tp_comm.get()});
  const RequestLimits limits = request_limits(mc, cfg);

  int64_t block_bytes = 0;
  const int64_t num_blocks = cache_blocks(cfg, mc, *ops, limits.max_seq_len, &block_bytes);
  DILU_USER_CHECK(num_blocks >= 1, "the KV cache gets no block: ", block_bytes, " bytes per block of ",
                  cfg.kv.block_size, " tokens do not fit; lower kv.block_size or raise kv.memory_fraction");
  KvCache cache(*ops, mc.num_hidden_layers, num_blocks, cfg.kv.block_size, mc.kv_lora_rank + mc.qk_rope_head_dim);
  EngineOptions eo;
  eo.limits = {cfg.batch.max_seqs, cfg.batch.max_tokens, cfg.kv.block_size};
  eo.max_seq_len = limits.max_seq_len;
  for (int64_t e : mc.eos_token_ids) eo.eos_token_ids.push_back(static_cast<int32_t>(e));
  s.load_seconds = seconds_since(t_load);
  if (!g.is_replica_root()) {
    follow_steps(model, *ops, cache, *g.tp_comm);
    g.world_comm->barrier();
    g.world_comm->barrier();
    return s;
  }
  Engine engine(model, *ops, cache, eo, encoder.tokenizer(), g.tp_comm.get());
  log << "dilu: model loaded in " << std::fixed << std::setprecision(2) << s.load_seconds << " s on " << ops->name()
      << "; tokenizer " << (encoder.tokenizer() ? "loaded" : "absent (token ids only)") << "; chat template "
      << (encoder.chat_template() ? encoder.chat_template()->name() : std::string("none")) << "; KV cache "
      << num_blocks << " blocks of " << cfg.kv.block_size << " tokens (" << (num_blocks * block_bytes >> 20)
      << " MiB)\n";

  // Resume: what an earlier run answered is skipped.
  ResumeState resume;
  if (o.resume && !o.overwrite) {
    resume = load_resume_state(o.output);
    if (resume.records > 0 || resume.cut_torn_line)
      log << "dilu: resuming: " << o.output.string() << " holds " << resume.records << " records"
          << (resume.cut_torn_line ? " (a torn last line was cut)" : "") << "; their input lines are skipped\n";
  }
  // One replica writes the output itself; several write part files merged at the end.
  const std::filesystem::path out_path = g.dp == 1 ? o.output : part_file(o.output, g.dp_rank, g.dp);
  if (g.dp > 1 && !o.resume) {
    std::error_code ec;
    DILU_USER_CHECK(!std::filesystem::is_regular_file(o.output, ec) || std::filesystem::file_size(o.output, ec) == 0,
                    "output file '", o.output.string(), "' already exists and is not empty (--no-resume)");
  }
  std::optional<JsonlWriter> writer_storage;
  writer_storage.emplace(out_path, o.overwrite ? JsonlWriter::Mode::Overwrite
                                               : (o.resume || g.dp > 1 ? JsonlWriter::Mode::Append
                                                                       : JsonlWriter::Mode::Create));
  JsonlWriter& writer = *writer_storage;

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
        if (!err->id.is_null() && take_done(resume, err->id.dump())) {
          ++s.requests_skipped;
          continue;
        }
        fail(*err);
        continue;
      }
      Request& r = std::get<Request>(parsed);
      const std::string key = r.id.dump();
      const bool first = seen_ids.insert(key).second;
      if (take_done(resume, key)) {  // answered by an earlier run (its duplicate-id error too)
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
      for (const SampleOutput& so : res.samples) s.completion_tokens += static_cast<int64_t>(so.token_ids.size());
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
  writer_storage.reset();
  s.preemptions = engine.num_preemptions();
  s.generate_seconds = seconds_since(t_gen);
  g.world_comm->barrier();  // every replica has written its records
  if (g.world.rank == 0 && g.dp > 1) merge_part_files(o.output);
  g.world_comm->barrier();
  return s;
}

}  // namespace dilu
