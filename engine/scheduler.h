// Continuous batching: which sequences run in the next step and which of their tokens. Every
// step, running sequences continue (a decode token, or the next chunk of a long prompt) and
// waiting ones are admitted while the token budget, the sequence limit and the free KV-cache
// blocks allow; when blocks run out the most recently admitted sequences are preempted (their
// blocks freed, their tokens recomputed later). Plain C++: tested with fake sequences.
#pragma once

#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <utility>
#include <vector>

#include "engine/block_manager.h"

namespace dilu {

struct SchedulerLimits {
  int64_t max_seqs = 1;     // sequences per step (batch.max_seqs)
  int64_t max_tokens = 1;   // tokens per step, prefill and decode together (batch.max_tokens)
  int64_t block_size = 1;   // tokens per KV-cache block
};

struct Sequence {
  int64_t id = 0;                 // unique
  int64_t request = 0;            // the request it answers (the caller's index)
  int64_t sample = 0;             // sample index of that request, 0..n-1
  std::vector<int32_t> tokens;    // prompt then generated tokens
  int64_t prompt_len = 0;
  int64_t num_computed = 0;       // tokens whose cache entries exist
  std::vector<int32_t> block_table;
  int64_t pending_forks = 0;      // samples still to be forked from this one after its prefill
  int64_t admitted = -1;          // admission stamp: larger = more recent
  int64_t num_preemptions = 0;
  int64_t num_generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
};

// One sequence's share of a step: tokens [start, start + count) of its token list.
struct ScheduledChunk {
  Sequence* seq = nullptr;
  int64_t start = 0;
  int64_t count = 0;
  // The chunk ends at the sequence's last token: the step yields its next-token logits.
  bool wants_logits = false;
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;
  // Blocks to copy (every layer) before the step runs: forks un-sharing a partly filled block.
  std::vector<std::pair<int32_t, int32_t>> block_copies;
  int64_t num_tokens = 0;
  bool empty() const { return chunks.empty(); }
};

class Scheduler {
 public:
  Scheduler(SchedulerLimits limits, int64_t num_blocks);

  // Queues a sequence holding its prompt. With n > 1 samples, pass one sequence with
  // pending_forks = n - 1: it forks after its prefill and the samples share the prompt's blocks.
  Sequence* add(std::unique_ptr<Sequence> seq);
  // Blocks a sequence of `tokens` tokens needs; a request that needs more than exist can never run.
  int64_t blocks_for(int64_t tokens) const { return (tokens + limits_.block_size - 1) / limits_.block_size; }
  int64_t num_blocks() const { return blocks_.num_blocks(); }

  StepPlan schedule();
  // After the step: `chunk` ran. For a chunk that wanted logits, the caller samples and then
  // calls append() for the sequence (and for each fork that fork() returns).
  void completed(const ScheduledChunk& chunk);
  // Forks the pending samples of `seq` (after its prompt is computed): each shares the full
  // blocks and gets a copy of the partly filled last one. Returns the new sequences.
  std::vector<Sequence*> fork(Sequence* seq);
  void append(Sequence* seq, int32_t token) { seq->tokens.push_back(token); }
  // The sequence is done: its blocks are released and it leaves the scheduler.
  std::unique_ptr<Sequence> finish(Sequence* seq);

  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  bool idle() const { return waiting_.empty() && running_.empty(); }
  int64_t num_preemptions() const { return preemptions_; }
  const BlockManager& blocks() const { return blocks_; }

 private:
  // Makes room for `seq` to hold `tokens` tokens, preempting the newest running sequences
  // other than it; false if `seq` itself had to be preempted.
  bool reserve(Sequence* seq, int64_t tokens, const std::vector<ScheduledChunk>& scheduled);
  void preempt(Sequence* seq);

  SchedulerLimits limits_;
  BlockManager blocks_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::list<std::unique_ptr<Sequence>> running_;  // admission order, oldest first
  std::vector<std::pair<int32_t, int32_t>> pending_copies_;
  int64_t next_stamp_ = 0;
  int64_t next_id_ = 1;
  int64_t preemptions_ = 0;
};

}  // namespace dilu
