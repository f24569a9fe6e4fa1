// The engine loop: requests in, one model step at a time over a continuously batched set of
// sequences, finished requests out. Owns the scheduler, the per-sequence decode state (text,
// stop strings, logprobs) and the sampling; knows nothing of files (run_job.cpp does the I/O).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "engine/deepseek_v3.h"
#include "engine/kv_cache.h"
#include "engine/output_record.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"

namespace dilu {

class Tokenizer;
class DecodeStream;
class TraceRecorder;

// The communicators of one replica; all null for a single rank.
struct ReplicaComms {
  Communicator* replica = nullptr;  // every rank of the replica; rank 0 schedules
  Communicator* pp = nullptr;       // this rank's counterparts in the other stages (rank = stage)
  int pp_size = 1;
  int pp_rank = 0;
  int tp_rank = 0;
  int micro_batches = 0;            // per step with pipeline stages; 0: one per stage
};

// A request ready to run: prompt encoded, sampling resolved.
struct EngineRequest {
  int64_t handle = 0;            // the caller's key, returned with the result
  std::vector<int32_t> prompt;   // token ids
  SamplingParams sampling;
  uint64_t seed = 0;             // of its draws (request_seed)
};

struct EngineResult {
  int64_t handle = 0;
  int64_t prompt_tokens = 0;
  std::vector<SampleOutput> samples;  // n, in sample order
  std::chrono::steady_clock::time_point submitted{};    // submit() was called
  std::chrono::steady_clock::time_point first_token{};  // its first token was drawn
};

// Whether step N + 1 is queued before step N's tokens reach the host (docs/engine.md, "Overlapped
// steps"). Each sequence that may go on gets a placeholder for the token step N draws; the
// backend reads that token on the device (Ops::set_token_feed); a sequence that stops at step N
// wastes its row of step N + 1, whose draw is dropped.
enum class StepOverlap {
  automatic,  // where the backend feeds tokens on the device and the replica is one rank
  off,
  host,       // the same bookkeeping with the tokens filled in on the host (tests, CPU backend)
};

struct EngineOptions {
  SchedulerLimits limits;
  int64_t max_seq_len = 0;                 // prompt + completion tokens at most
  std::vector<int32_t> eos_token_ids;      // config.json eos_token_id
  // DILU_STEP_OVERLAP=0 / host in the environment overrides automatic (a switch for measuring
  // and testing).
  StepOverlap overlap = StepOverlap::automatic;
};

struct StepStats {
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  int64_t sequences = 0;
  int64_t tokens_generated = 0;
};

class Engine {
 public:
  // `tokenizer` may be null (token ids only: no text, no stop strings). With a replica of
  // several ranks, this is its root (TP rank 0 of stage 0): every step is broadcast to the other
  // ranks, which run follow_steps() until stop_followers().
  Engine(DeepseekV3& model, Ops& ops, KvCache& cache, EngineOptions options, const Tokenizer* tokenizer,
         const ReplicaComms& comms = {});
  ~Engine();
  // Tells the ranks in follow_steps() that no step comes any more.
  void stop_followers();

  // The blocks a request needs at its longest; a request that needs more than the cache holds
  // can never run and must be refused by the caller.
  int64_t blocks_needed(const EngineRequest& r) const;
  int64_t num_blocks() const { return scheduler_.num_blocks(); }
  void submit(EngineRequest r);
  // No request left, and no step queued whose draws are still to be read.
  bool idle() const { return requests_.empty() && !inflight_; }
  int64_t num_requests() const { return static_cast<int64_t>(requests_.size()); }
  // Runs one model step; returns the requests that finished in it. With overlapped steps it first
  // queues the next step, then waits for this one's tokens.
  std::vector<EngineResult> step();
  const StepStats& last_step() const { return last_; }
  int64_t num_preemptions() const { return scheduler_.num_preemptions(); }
  // Steps are recorded there (their phases and counts); null: not recorded.
  void set_trace(TraceRecorder* trace) { trace_ = trace; }

 private:
  struct SequenceState;
  struct RequestState;
  struct Launched;
  // Schedules and queues a step. With `prev` (a step queued before, whose draws are not read),
  // the placeholders of prev's sequences take prev's tokens; returns null when nothing could be
  // scheduled then.
  std::unique_ptr<Launched> launch(Launched* prev);
  // Waits for (or draws) a queued step's tokens.
  void collect(Launched& l);
  bool overlapping() const;
  // Appends the sampled token and decides whether the sequence is done.
  void accept(Sequence* seq, const SampleResult& s);
  void finish(Sequence* seq, std::vector<EngineResult>& done);

  DeepseekV3& model_;
  Ops& ops_;
  KvCache& cache_;
  EngineOptions options_;
  const Tokenizer* tokenizer_;
  ReplicaComms comms_;
  Scheduler scheduler_;
  std::map<int64_t, std::unique_ptr<RequestState>> requests_;       // by handle
  std::map<const Sequence*, std::unique_ptr<SequenceState>> seqs_;  // decode state per sequence
  std::vector<EngineResult> ready_;                                 // finished without a step (max_tokens 0)
  StepStats last_;
  TraceRecorder* trace_ = nullptr;
  std::unique_ptr<Launched> inflight_;  // queued, draws not read yet
  StepOverlap overlap_ = StepOverlap::off;  // resolved at construction
};

// The loop of a rank that does not schedule: receives each step from the replica's root,
// runs its share of the model on it (taking part in the collectives), until the root stops.
// Each step is recorded in `trace` when given.
void follow_steps(DeepseekV3& model, Ops& ops, KvCache& cache, const ReplicaComms& comms,
                  TraceRecorder* trace = nullptr);

}  // namespace dilu
