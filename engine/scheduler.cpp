// See scheduler.h.
#include "engine/scheduler.h"

#include <algorithm>

#include "kernels/error.h"

namespace dilu {

Scheduler::Scheduler(SchedulerLimits limits, int64_t num_blocks) : limits_(limits), blocks_(num_blocks) {
  DILU_CHECK(limits.max_seqs >= 1 && limits.max_tokens >= 1 && limits.block_size >= 1, "scheduler limits");
}

Sequence* Scheduler::add(std::unique_ptr<Sequence> seq) {
  DILU_CHECK(!seq->tokens.empty() && seq->num_computed == 0 && seq->block_table.empty(), "bad new sequence");
  seq->id = next_id_++;
  waiting_.push_back(std::move(seq));
  return waiting_.back().get();
}

void Scheduler::preempt(Sequence* seq) {
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == seq; });
  DILU_CHECK(it != running_.end(), "preempting a sequence that is not running");
  blocks_.release(seq->block_table);
  seq->num_computed = 0;
  seq->admitted = -1;
  ++seq->num_preemptions;
  ++preemptions_;
  // Recomputed first when room returns: it was admitted before everything still waiting.
  waiting_.push_front(std::move(*it));
  running_.erase(it);
}

bool Scheduler::reserve(Sequence* seq, int64_t tokens, const std::vector<ScheduledChunk>& scheduled) {
  const int64_t needed = blocks_for(tokens) - static_cast<int64_t>(seq->block_table.size());
  while (needed > blocks_.num_free()) {
    // The newest running sequence that is not already part of this step gives way.
    Sequence* victim = nullptr;
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      Sequence* s = it->get();
      const bool in_step = std::any_of(scheduled.begin(), scheduled.end(), [&](const auto& c) { return c.seq == s; });
      if (!in_step) {
        victim = s;
        break;
      }
    }
    if (victim == nullptr) return false;  // only sequences of this step hold blocks: wait for them
    preempt(victim);
    if (victim == seq) return false;
  }
  if (needed > 0) blocks_.allocate(needed, seq->block_table);
  return true;
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  plan.block_copies = std::move(pending_copies_);
  pending_copies_.clear();
  int64_t budget = limits_.max_tokens;

  // Running sequences first, oldest first: each continues with its remaining tokens (one for a
  // decode, a chunk for a prompt that did not fit in earlier steps).
  std::vector<Sequence*> order;
  for (auto& s : running_) order.push_back(s.get());
  for (Sequence* s : order) {
    if (budget == 0) break;
    const bool still_running = std::any_of(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == s; });
    if (!still_running) continue;  // preempted while making room for an older one
    const int64_t remaining = static_cast<int64_t>(s->tokens.size()) - s->num_computed;
    if (remaining <= 0) continue;
    const int64_t count = std::min(remaining, budget);
    if (!reserve(s, s->num_computed + count, plan.chunks)) continue;
    plan.chunks.push_back({s, s->num_computed, count, s->num_computed + count == static_cast<int64_t>(s->tokens.size())});
    budget -= count;
  }

  // Then admit waiting sequences in order while the limits and the free blocks allow; a new
  // admission never preempts anyone.
  while (!waiting_.empty() && budget > 0 && static_cast<int64_t>(running_.size()) < limits_.max_seqs) {
    Sequence* s = waiting_.front().get();
    const int64_t count = std::min(static_cast<int64_t>(s->tokens.size()), budget);
    const int64_t needed = blocks_for(count);
    if (needed > blocks_.num_free()) break;
    blocks_.allocate(needed, s->block_table);
    s->admitted = next_stamp_++;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    plan.chunks.push_back({s, 0, count, count == static_cast<int64_t>(s->tokens.size())});
    budget -= count;
  }
  for (const auto& c : plan.chunks) plan.num_tokens += c.count;
  return plan;
}

void Scheduler::completed(const ScheduledChunk& chunk) {
  DILU_CHECK(chunk.seq->num_computed == chunk.start, "chunk out of order");
  chunk.seq->num_computed += chunk.count;
}

std::vector<Sequence*> Scheduler::fork(Sequence* seq) {
  std::vector<Sequence*> out;
  const int64_t bs = limits_.block_size;
  const int64_t full = seq->num_computed / bs;  // blocks completely written: shared
  const bool partial = seq->num_computed % bs != 0;
  for (; seq->pending_forks > 0; --seq->pending_forks) {
    auto f = std::make_unique<Sequence>();
    f->id = next_id_++;
    f->request = seq->request;
    f->sample = seq->sample + static_cast<int64_t>(out.size()) + 1;
    f->tokens.assign(seq->tokens.begin(), seq->tokens.begin() + seq->num_computed);
    f->prompt_len = seq->prompt_len;
    f->num_computed = seq->num_computed;
    std::vector<int32_t> shared(seq->block_table.begin(), seq->block_table.begin() + full);
    blocks_.share(shared);
    f->block_table = std::move(shared);
    const bool room = static_cast<int64_t>(running_.size()) < limits_.max_seqs && (!partial || blocks_.can_allocate(1));
    if (!room) {
      // No room among the running sequences (or no block for its own copy of the partial
      // block): the sample waits and recomputes its prompt when admitted.
      blocks_.release(f->block_table);
      f->num_computed = 0;
      waiting_.push_front(std::move(f));
      out.push_back(waiting_.front().get());
      continue;
    }
    if (partial) {
      blocks_.allocate(1, f->block_table);
      pending_copies_.push_back({seq->block_table[static_cast<size_t>(full)], f->block_table.back()});
    }
    f->admitted = next_stamp_++;
    running_.push_back(std::move(f));
    out.push_back(running_.back().get());
  }
  return out;
}

std::unique_ptr<Sequence> Scheduler::finish(Sequence* seq) {
  std::unique_ptr<Sequence> out;
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == seq; });
  if (it != running_.end()) {
    out = std::move(*it);
    running_.erase(it);
  } else {
    auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& p) { return p.get() == seq; });
    DILU_CHECK(w != waiting_.end(), "finishing an unknown sequence");
    out = std::move(*w);
    waiting_.erase(w);
  }
  blocks_.release(out->block_table);
  return out;
}

}  // namespace dilu
