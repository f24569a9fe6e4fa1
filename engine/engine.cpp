// See engine.h.
#include "engine/engine.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "engine/byte_io.h"
#include "engine/tokenizer.h"
#include "engine/trace.h"

namespace dilu {

struct Engine::SequenceState {
  int64_t handle = 0;
  std::unique_ptr<DecodeStream> stream;  // null without a tokenizer
  SampleOutput out;
  size_t stop_scan_from = 0;  // text before this offset was searched for stop strings already
  bool done = false;
  // Its last token is a placeholder for a draw of the queued step not read yet (overlapped steps).
  bool placeholder = false;
};

struct Engine::RequestState {
  EngineRequest req;
  int64_t max_tokens = 0;  // per sample, capped by max_seq_len
  std::vector<SampleOutput> samples;
  int64_t num_done = 0;
  std::chrono::steady_clock::time_point submitted{}, first_token{};
};

namespace {

// A step as the root sends it to the other ranks of its TP group: block copies, then the step
// input (engine/byte_io.h). An empty message means "stop".
std::vector<uint8_t> encode_step(const StepInput& in, const std::vector<std::pair<int32_t, int32_t>>& copies) {
  std::vector<uint8_t> b;
  put_vec(b, copies);
  put_vec(b, in.token_ids);
  put_vec(b, in.layout.token_seq);
  put_vec(b, in.layout.token_pos);
  put_vec(b, in.layout.token_slot);
  put_bytes(b, &in.layout.block_size, sizeof in.layout.block_size);
  const uint64_t tables = in.layout.block_tables.size();
  put_bytes(b, &tables, sizeof tables);
  for (const auto& t : in.layout.block_tables) put_vec(b, t);
  put_vec(b, in.logit_rows);
  return b;
}

StepInput decode_step(const std::vector<uint8_t>& b, std::vector<std::pair<int32_t, int32_t>>& copies,
                      size_t* used = nullptr) {
  ByteReader r{b};
  StepInput in;
  copies = r.vec<std::pair<int32_t, int32_t>>();
  in.token_ids = r.vec<int32_t>();
  in.layout.token_seq = r.vec<int32_t>();
  in.layout.token_pos = r.vec<int32_t>();
  in.layout.token_slot = r.vec<int64_t>();
  r.get(&in.layout.block_size, sizeof in.layout.block_size);
  uint64_t tables = 0;
  r.get(&tables, sizeof tables);
  for (uint64_t i = 0; i < tables; ++i) in.layout.block_tables.push_back(r.vec<int32_t>());
  in.logit_rows = r.vec<int32_t>();
  if (used) *used = r.at;
  return in;
}


// What the last stage needs to sample one sequence's next token (the strings of the sampling
// parameters stay with the root, which applies stop strings).
struct DrawSpec {
  int32_t row = 0;  // logits row of the step
  double temperature = 0, top_p = 1, min_p = 0;
  int64_t top_k = 0, top_logprobs = 0, sample = 0, position = 0;
  uint64_t seed = 0;
  uint8_t logprobs = 0;
};

SamplingParams params_of(const DrawSpec& d) {
  SamplingParams p;
  p.temperature = d.temperature;
  p.top_p = d.top_p;
  p.top_k = d.top_k;
  p.min_p = d.min_p;
  p.logprobs = d.logprobs != 0;
  p.top_logprobs = d.top_logprobs;
  return p;
}

// One draw: row `row` of the step's logits for a sequence with these parameters.
struct Draw {
  int64_t row = 0;
  SamplingParams params;
  uint64_t seed = 0;
  int64_t sample = 0;
  int64_t position = 0;
};

// The backend sampler's form of draws (Ops::sample, Ops::begin_sample).
std::vector<SampleSpec> sample_specs(const std::vector<Draw>& draws) {
  std::vector<SampleSpec> specs(draws.size());
  for (size_t i = 0; i < draws.size(); ++i) {
    const Draw& d = draws[i];
    specs[i] = SampleSpec{static_cast<int32_t>(d.row), d.params.temperature, d.params.top_p, d.params.top_k,
                          d.params.min_p, sample_uniform(d.seed, d.sample, d.position), d.params.logprobs,
                          d.params.top_logprobs};
  }
  return specs;
}

std::vector<SampleResult> results_of(const std::vector<SampleOut>& out) {
  std::vector<SampleResult> results(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    results[i].token = out[i].token;
    results[i].logprob = out[i].logprob;
    results[i].top = out[i].top;
  }
  return results;
}

// Draws the tokens where the logits are: on the device when the backend samples (only the
// tokens and logprobs come back), else on the host from the copied logits. Same semantics.
std::vector<SampleResult> draw_tokens(Ops& ops, const Tensor& logits_dev, const std::vector<Draw>& draws) {
  std::vector<SampleResult> results(draws.size());
  if (draws.empty()) return results;
  if (ops.has_device_sampler()) return results_of(ops.sample(logits_dev, sample_specs(draws)));
  const int64_t vocab = logits_dev.dim(1);
  std::vector<float> logits(static_cast<size_t>(logits_dev.numel()));
  ops.copy_to_host(logits_dev, logits.data());
#pragma omp parallel for schedule(dynamic) if (draws.size() > 1)
  for (size_t i = 0; i < draws.size(); ++i) {
    const Draw& d = draws[i];
    std::span<const float> row(logits.data() + d.row * vocab, static_cast<size_t>(vocab));
    results[i] = sample(row, d.params, d.seed, d.sample, d.position);
  }
  return results;
}

std::vector<uint8_t> encode_results(const std::vector<SampleResult>& rs) {
  std::vector<uint8_t> b;
  const uint64_t n = rs.size();
  put_bytes(b, &n, sizeof n);
  for (const SampleResult& r : rs) {
    put_bytes(b, &r.token, sizeof r.token);
    put_bytes(b, &r.logprob, sizeof r.logprob);
    put_vec(b, r.top);
  }
  return b;
}

std::vector<SampleResult> decode_results(const std::vector<uint8_t>& b) {
  ByteReader rd{b};
  uint64_t n = 0;
  rd.get(&n, sizeof n);
  std::vector<SampleResult> rs(n);
  for (SampleResult& r : rs) {
    rd.get(&r.token, sizeof r.token);
    rd.get(&r.logprob, sizeof r.logprob);
    r.top = rd.vec<std::pair<int32_t, float>>();
  }
  return rs;
}

// Splits a step into micro-batches of whole sequences with about equal token counts, so that
// pipeline stages work on different micro-batches at the same time.
std::vector<StepInput> split_micro_batches(const StepInput& in, int64_t parts) {
  const int64_t seqs = static_cast<int64_t>(in.layout.block_tables.size());
  parts = std::max<int64_t>(1, std::min(parts, seqs));
  std::vector<int64_t> seq_end(static_cast<size_t>(seqs), 0);  // token index after each sequence's last
  for (size_t t = 0; t < in.token_ids.size(); ++t) seq_end[static_cast<size_t>(in.layout.token_seq[t])] = static_cast<int64_t>(t) + 1;
  const int64_t total = static_cast<int64_t>(in.token_ids.size());
  std::vector<StepInput> out;
  int64_t seq = 0, token = 0;
  for (int64_t p = 0; p < parts; ++p) {
    StepInput mb;
    mb.layout.block_size = in.layout.block_size;
    const int64_t target = total * (p + 1) / parts;
    const int64_t first_token = token;
    const int64_t leave = parts - p - 1;  // sequences the later parts need at least
    // At least one sequence; more while they end within this part's share of the tokens.
    while (seq < seqs - leave && (mb.layout.block_tables.empty() || seq_end[static_cast<size_t>(seq)] <= target ||
                                  p == parts - 1)) {
      const int32_t local = static_cast<int32_t>(mb.layout.block_tables.size());
      mb.layout.block_tables.push_back(in.layout.block_tables[static_cast<size_t>(seq)]);
      for (; token < seq_end[static_cast<size_t>(seq)]; ++token) {
        mb.token_ids.push_back(in.token_ids[static_cast<size_t>(token)]);
        mb.layout.token_seq.push_back(local);
        mb.layout.token_pos.push_back(in.layout.token_pos[static_cast<size_t>(token)]);
        mb.layout.token_slot.push_back(in.layout.token_slot[static_cast<size_t>(token)]);
      }
      ++seq;
    }
    for (int32_t r : in.logit_rows)
      if (r >= first_token && r < token) mb.logit_rows.push_back(static_cast<int32_t>(r - first_token));
    out.push_back(std::move(mb));
  }
  return out;
}

// This rank's share of a step with pipeline stages: embed (first stage) or receive the hidden
// states, run the stage's layers, send them on, or (last stage) compute the logits and, on TP
// rank 0, draw the tokens and send them to the root. Returns the draws on the root.
std::vector<SampleResult> run_pipeline_step(DeepseekV3& model, Ops& ops, KvCache& cache, const ReplicaComms& c,
                                            const StepInput& in, const std::vector<DrawSpec>& draws) {
  const int64_t parts = c.micro_batches > 0 ? c.micro_batches : c.pp_size;
  const std::vector<StepInput> mbs = split_micro_batches(in, parts);
  const bool first = c.pp_rank == 0, last = c.pp_rank == c.pp_size - 1;
  std::vector<SampleResult> results(draws.size());
  int64_t row_base = 0;
  for (const StepInput& mb : mbs) {
    Tensor x;
    if (first) {
      x = model.embed(mb);
    } else {
      x = ops.empty(ops.activation_dtype(), {static_cast<int64_t>(mb.token_ids.size()), model.config().hidden_size});
      c.pp->recv(x, c.pp_rank - 1);
    }
    model.run_layers(x, mb, cache);
    if (!last) {
      c.pp->send(x, c.pp_rank + 1);  // returns once the next stage takes it: stages overlap
    } else if (c.tp_rank == 0) {
      Tensor logits_dev = model.head(x, mb);
      std::vector<Draw> here;
      std::vector<size_t> which;
      for (size_t i = 0; i < draws.size(); ++i) {
        const int64_t local = draws[i].row - row_base;
        if (local < 0 || local >= static_cast<int64_t>(mb.logit_rows.size())) continue;
        here.push_back({local, params_of(draws[i]), draws[i].seed, draws[i].sample, draws[i].position});
        which.push_back(i);
      }
      std::vector<SampleResult> got = draw_tokens(ops, logits_dev, here);
      for (size_t j = 0; j < which.size(); ++j) results[which[j]] = std::move(got[j]);
    } else {
      model.head(x, mb);  // takes part in the TP gather of the logits
    }
    row_base += static_cast<int64_t>(mb.logit_rows.size());
  }
  if (last && !first && c.tp_rank == 0) c.pp->send_bytes(encode_results(results), 0);
  if (first && !last && c.tp_rank == 0) {
    std::vector<uint8_t> bytes;
    c.pp->recv_bytes(bytes, c.pp_size - 1);
    results = decode_results(bytes);
  }
  return results;
}

// DILU_STEP_OVERLAP: 0 off, host the host-filled form, else as configured.
StepOverlap overlap_from_env(StepOverlap configured) {
  const char* e = std::getenv("DILU_STEP_OVERLAP");
  if (e == nullptr || *e == '\0') return configured;
  const std::string v = e;
  if (v == "0" || v == "off") return StepOverlap::off;
  if (v == "host") return StepOverlap::host;
  DILU_USER_CHECK(v == "1" || v == "auto", "DILU_STEP_OVERLAP must be 0, 1, auto or host, got '", v, "'");
  return StepOverlap::automatic;
}

std::vector<uint8_t> encode_message(const StepInput& in, const std::vector<std::pair<int32_t, int32_t>>& copies,
                                    const std::vector<DrawSpec>& draws, const StepCounts& counts) {
  std::vector<uint8_t> b = encode_step(in, copies);
  put_vec(b, draws);
  put_bytes(b, &counts, sizeof counts);  // for the other ranks' traces
  return b;
}

}  // namespace

void follow_steps(DeepseekV3& model, Ops& ops, KvCache& cache, const ReplicaComms& comms, TraceRecorder* trace) {
  for (;;) {
    std::vector<uint8_t> msg;
    comms.replica->broadcast(msg, 0);  // waiting for the root is not part of a step
    if (msg.empty()) return;
    if (trace) trace->begin_step();
    std::vector<std::pair<int32_t, int32_t>> copies;
    size_t used = 0;
    const StepInput in = decode_step(msg, copies, &used);
    ByteReader rd{msg, used};
    const std::vector<DrawSpec> draws = rd.vec<DrawSpec>();
    StepCounts counts;
    rd.get(&counts, sizeof counts);
    if (trace) trace->host_done();
    if (!copies.empty()) cache.copy_blocks(ops, copies);
    if (comms.pp_size == 1) model.forward(in, cache);
    else run_pipeline_step(model, ops, cache, comms, in, draws);
    if (trace) {
      trace->compute_done();
      trace->end_step(counts);
    }
  }
}

void Engine::stop_followers() {
  if (comms_.replica && comms_.replica->size() > 1) {
    std::vector<uint8_t> empty;
    comms_.replica->broadcast(empty, 0);
  }
}

Engine::Engine(DeepseekV3& model, Ops& ops, KvCache& cache, EngineOptions options, const Tokenizer* tokenizer,
               const ReplicaComms& comms)
    : model_(model),
      ops_(ops),
      cache_(cache),
      options_(std::move(options)),
      tokenizer_(tokenizer),
      comms_(comms),
      scheduler_(options_.limits, cache.num_blocks()) {
  DILU_CHECK(options_.limits.block_size == cache.block_size(), "scheduler and cache block sizes differ");
  const bool one_rank = comms_.pp_size == 1 && !(comms_.replica && comms_.replica->size() > 1);
  const StepOverlap want = overlap_from_env(options_.overlap);
  if (one_rank && want == StepOverlap::host) overlap_ = StepOverlap::host;
  if (one_rank && want == StepOverlap::automatic && ops_.has_token_feed()) overlap_ = StepOverlap::automatic;
}

// A step queued on the backend: its draws (the sequence and its logits row) and what the host
// needs to read them.
struct Engine::Launched {
  std::vector<std::pair<Sequence*, size_t>> draws;
  std::vector<uint8_t> dropped;  // draw i's sequence stopped before this step's draws were read
  std::vector<Draw> specs;       // host draws (no device sampling begun)
  Tensor logits;                 // for the host draws
  bool sampling = false;         // Ops::begin_sample() was called
  bool have_results = false;
  std::vector<SampleResult> results;
  StepStats stats;
  StepCounts counts;
};

Engine::~Engine() {
  if (!inflight_) return;
  try {  // the backend's begun sample must finish before the next engine's
    collect(*inflight_);
  } catch (const std::exception& e) {
    std::cerr << "dilu: a queued step failed while the engine closed: " << e.what() << "\n";
  }
}

bool Engine::overlapping() const { return overlap_ != StepOverlap::off; }

int64_t Engine::blocks_needed(const EngineRequest& r) const {
  const int64_t len = std::min<int64_t>(static_cast<int64_t>(r.prompt.size()) + r.sampling.max_tokens, options_.max_seq_len);
  return scheduler_.blocks_for(std::max<int64_t>(len, 1));
}

void Engine::submit(EngineRequest r) {
  DILU_CHECK(!r.prompt.empty() && r.sampling.n >= 1, "bad engine request");
  DILU_CHECK(!requests_.count(r.handle), "duplicate handle ", r.handle);
  auto st = std::make_unique<RequestState>();
  st->submitted = std::chrono::steady_clock::now();
  st->max_tokens = std::min<int64_t>(r.sampling.max_tokens, options_.max_seq_len - static_cast<int64_t>(r.prompt.size()));
  st->samples.resize(static_cast<size_t>(r.sampling.n));
  if (st->max_tokens <= 0) {  // nothing to generate: answered without touching the model
    for (auto& s : st->samples) s.finish_reason = "length";
    ready_.push_back({r.handle, static_cast<int64_t>(r.prompt.size()), std::move(st->samples), st->submitted,
                      st->submitted});
    return;
  }
  auto seq = std::make_unique<Sequence>();
  seq->request = r.handle;
  seq->tokens = r.prompt;
  seq->prompt_len = static_cast<int64_t>(r.prompt.size());
  seq->pending_forks = r.sampling.n - 1;
  Sequence* s = scheduler_.add(std::move(seq));
  auto ss = std::make_unique<SequenceState>();
  ss->handle = r.handle;
  if (tokenizer_) ss->stream = std::make_unique<DecodeStream>(*tokenizer_, /*skip_special_tokens=*/true);
  seqs_[s] = std::move(ss);
  st->req = std::move(r);
  requests_[st->req.handle] = std::move(st);
}

void Engine::accept(Sequence* seq, const SampleResult& sampled) {
  SequenceState& ss = *seqs_.at(seq);
  RequestState& rs = *requests_.at(ss.handle);
  const SamplingParams& p = rs.req.sampling;
  scheduler_.append(seq, sampled.token);
  SampleOutput& out = ss.out;
  out.token_ids.push_back(sampled.token);
  if (p.logprobs) {
    auto text_of = [&](int32_t id) {
      return tokenizer_ ? tokenizer_->decode(std::span<const int32_t>(&id, 1), false) : std::string();
    };
    PositionLogprobs lp;
    lp.chosen = {sampled.token, text_of(sampled.token), sampled.logprob};
    for (auto [id, logprob] : sampled.top) lp.top.push_back({id, text_of(id), logprob});
    out.logprobs.push_back(std::move(lp));
  }
  if (ss.stream) out.text += ss.stream->push(sampled.token);

  const auto& eos = options_.eos_token_ids;
  const bool is_eos = std::find(eos.begin(), eos.end(), sampled.token) != eos.end();
  const bool is_stop_token =
      std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), sampled.token) != p.stop_token_ids.end();
  if (is_stop_token) {
    out.finish_reason = "stop";
    out.stop_reason = sampled.token;
    ss.done = true;
  } else if (is_eos && !p.ignore_eos) {
    out.finish_reason = "stop";
    ss.done = true;
  }
  // Stop strings: search only the text that could hold a match not seen before.
  if (!ss.done && !p.stop.empty()) {
    size_t longest = 0;
    for (const auto& s : p.stop) longest = std::max(longest, s.size());
    const size_t from = ss.stop_scan_from;
    size_t best = std::string::npos;
    const std::string* hit = nullptr;
    for (const auto& s : p.stop) {
      if (s.empty()) continue;
      const size_t at = out.text.find(s, from);
      if (at != std::string::npos && at < best) {
        best = at;
        hit = &s;
      }
    }
    if (hit) {
      out.text.resize(p.include_stop_str_in_output ? best + hit->size() : best);
      out.finish_reason = "stop";
      out.stop_reason = *hit;
      ss.done = true;
      ss.stream.reset();  // the text ends here
    } else if (out.text.size() + 1 > longest) {
      ss.stop_scan_from = out.text.size() + 1 - longest;
    }
  }
  if (!ss.done && (seq->num_generated() >= rs.max_tokens)) {
    out.finish_reason = "length";
    ss.done = true;
  }
  if (ss.done && ss.stream) out.text += ss.stream->flush();
}

void Engine::finish(Sequence* seq, std::vector<EngineResult>& done) {
  auto node = seqs_.extract(seq);
  SequenceState& ss = *node.mapped();
  RequestState& rs = *requests_.at(ss.handle);
  rs.samples[static_cast<size_t>(seq->sample)] = std::move(ss.out);
  scheduler_.finish(seq);
  if (++rs.num_done == rs.req.sampling.n) {
    done.push_back({rs.req.handle, static_cast<int64_t>(rs.req.prompt.size()), std::move(rs.samples), rs.submitted,
                    rs.first_token});
    requests_.erase(rs.req.handle);
  }
}

std::unique_ptr<Engine::Launched> Engine::launch(Launched* prev) {
  StepPlan plan = scheduler_.schedule();
  if (plan.empty() && prev != nullptr) return nullptr;
  DILU_CHECK(!plan.empty(), "the scheduler made no progress with ", scheduler_.num_running(), " running and ",
             scheduler_.num_waiting(), " waiting sequences");
  auto l = std::make_unique<Launched>();
  if (!plan.block_copies.empty()) cache_.copy_blocks(ops_, plan.block_copies);

  // Step input: every chunk's tokens, each sequence reading its own blocks. A placeholder (the
  // last token of a sequence that prev draws for) is fed from prev's draw.
  std::map<const Sequence*, int32_t> prev_draw;
  if (prev != nullptr)
    for (size_t i = 0; i < prev->draws.size(); ++i) prev_draw[prev->draws[i].first] = static_cast<int32_t>(i);
  std::vector<TokenFeed> feed;
  StepInput in;
  in.layout.block_size = cache_.block_size();
  const int64_t bs = cache_.block_size();
  StepStats& st = l->stats;
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    const ScheduledChunk& c = plan.chunks[i];
    const bool fed_last = seqs_.at(c.seq)->placeholder;
    in.layout.block_tables.push_back(c.seq->block_table);
    for (int64_t p = c.start; p < c.start + c.count; ++p) {
      const bool fed = fed_last && p + 1 == static_cast<int64_t>(c.seq->tokens.size());
      if (fed) {
        DILU_CHECK(prev_draw.count(c.seq), "a placeholder token of a sequence the queued step does not draw for");
        feed.push_back({static_cast<int32_t>(in.token_ids.size()), prev_draw.at(c.seq)});
      }
      in.token_ids.push_back(fed ? 0 : c.seq->tokens[static_cast<size_t>(p)]);
      in.layout.token_seq.push_back(static_cast<int32_t>(i));
      in.layout.token_pos.push_back(static_cast<int32_t>(p));
      in.layout.token_slot.push_back(static_cast<int64_t>(c.seq->block_table[static_cast<size_t>(p / bs)]) * bs + p % bs);
    }
    if (c.wants_logits) in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size() - 1));
    (c.count == 1 && c.start >= c.seq->prompt_len ? st.decode_tokens : st.prefill_tokens) += c.count;
  }
  st.sequences = static_cast<int64_t>(plan.chunks.size());

  // Which sequences draw from which logits row (the forks of a prompt share its row). The
  // bookkeeping comes first so that a pipeline's last stage can be told every draw with the step.
  std::vector<std::pair<Sequence*, size_t>>& draws = l->draws;
  size_t row = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    scheduler_.completed(c);
    if (!c.wants_logits) continue;
    draws.push_back({c.seq, row});
    if (c.seq->pending_forks > 0) {
      for (Sequence* f : scheduler_.fork(c.seq)) {
        auto ss = std::make_unique<SequenceState>();
        ss->handle = c.seq->request;
        if (tokenizer_) ss->stream = std::make_unique<DecodeStream>(*tokenizer_, true);
        seqs_[f] = std::move(ss);
        draws.push_back({f, row});
      }
    }
    ++row;
  }
  l->dropped.assign(draws.size(), 0);
  st.tokens_generated = static_cast<int64_t>(draws.size());
  l->counts = StepCounts{st.prefill_tokens, st.decode_tokens, st.sequences, st.tokens_generated,
                         scheduler_.blocks().num_used()};
  if (trace_ && prev == nullptr) trace_->host_done();
  if (comms_.pp_size > 1) {
    std::vector<DrawSpec> specs;
    for (const auto& [s, r] : draws) {
      const RequestState& rs = *requests_.at(s->request);
      const SamplingParams& p = rs.req.sampling;
      specs.push_back({static_cast<int32_t>(r), p.temperature, p.top_p, p.min_p, p.top_k, p.top_logprobs, s->sample,
                       s->num_generated(), rs.req.seed, static_cast<uint8_t>(p.logprobs)});
    }
    std::vector<uint8_t> msg = encode_message(in, plan.block_copies, specs, l->counts);
    comms_.replica->broadcast(msg, 0);
    l->results = run_pipeline_step(model_, ops_, cache_, comms_, in, specs);
    l->have_results = true;
    return l;
  }
  if (comms_.replica && comms_.replica->size() > 1) {
    std::vector<uint8_t> msg = encode_message(in, plan.block_copies, {}, l->counts);
    comms_.replica->broadcast(msg, 0);
  }
  l->specs.resize(draws.size());
  for (size_t i = 0; i < draws.size(); ++i) {
    Sequence* s = draws[i].first;
    const RequestState& rs = *requests_.at(s->request);
    l->specs[i] = {static_cast<int64_t>(draws[i].second), rs.req.sampling, rs.req.seed, s->sample, s->num_generated()};
  }
  if (prev != nullptr && overlap_ == StepOverlap::host) {
    // The host form: prev's tokens are drawn before this step runs (its logits may share
    // prev's buffers) and written where the device would read them.
    collect(*prev);
    for (const TokenFeed& f : feed)
      in.token_ids[static_cast<size_t>(f.token)] = prev->results[static_cast<size_t>(f.draw)].token;
    feed.clear();
  }
  ops_.set_token_feed(feed);
  Tensor logits_dev = model_.forward(in, cache_);
  if (ops_.has_token_feed() && overlapping() && !draws.empty()) {
    ops_.begin_sample(logits_dev, sample_specs(l->specs));
    l->sampling = true;
  } else {
    l->logits = logits_dev;
  }
  return l;
}

void Engine::collect(Launched& l) {
  if (l.have_results) return;
  if (l.sampling) {
    l.results = results_of(ops_.finish_sample());
    DILU_CHECK(l.results.size() == l.draws.size(), "a begun sample returned ", l.results.size(), " draws for ",
               l.draws.size());
  } else {
    l.results = draw_tokens(ops_, l.logits, l.specs);
  }
  l.logits = Tensor();
  l.have_results = true;
}

std::vector<EngineResult> Engine::step() {
  std::vector<EngineResult> done = std::move(ready_);
  ready_.clear();
  last_ = {};
  if (!inflight_ && scheduler_.idle()) return done;
  if (trace_) trace_->begin_step();
  std::unique_ptr<Launched> cur = std::move(inflight_);
  if (!cur) cur = launch(nullptr);

  // Overlapped: the next step is queued before cur's tokens are read. Every sequence cur draws
  // for that may go on holds a placeholder for its draw; one that stops after all wastes its row.
  if (overlapping()) {
    for (size_t i = 0; i < cur->draws.size(); ++i) {
      if (cur->dropped[i]) continue;  // its sequence is gone
      Sequence* s = cur->draws[i].first;
      SequenceState& ss = *seqs_.at(s);
      const RequestState& rs = *requests_.at(ss.handle);
      if (ss.placeholder || s->num_generated() + 1 >= rs.max_tokens) continue;  // ends by length
      s->tokens.push_back(0);
      ss.placeholder = true;
    }
    inflight_ = launch(cur.get());
    if (trace_) trace_->host_done();
  }
  collect(*cur);
  if (trace_) trace_->compute_done();

  const auto now = std::chrono::steady_clock::now();
  std::vector<Sequence*> finished;
  for (size_t i = 0; i < cur->draws.size(); ++i) {
    if (cur->dropped[i]) continue;
    Sequence* s = cur->draws[i].first;
    SequenceState& ss = *seqs_.at(s);
    if (ss.placeholder) {  // the draw takes its place
      s->tokens.pop_back();
      ss.placeholder = false;
    }
    RequestState& rs = *requests_.at(s->request);
    if (rs.first_token == std::chrono::steady_clock::time_point{}) rs.first_token = now;
    accept(s, cur->results[i]);
    if (ss.done) finished.push_back(s);
  }
  for (Sequence* s : finished) {
    if (inflight_) {  // the queued step computed a row for it in vain
      for (size_t i = 0; i < inflight_->draws.size(); ++i)
        if (inflight_->draws[i].first == s) inflight_->dropped[i] = 1;
    }
    finish(s, done);
  }
  last_ = cur->stats;
  if (trace_) trace_->end_step(cur->counts);
  return done;
}

}  // namespace dilu
