// Scheduler and block manager with fake sequences: no model, just the bookkeeping of continuous
// batching (limits, chunked prefill, preemption, forks) checked step by step.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <set>

namespace dilu {
namespace {

std::unique_ptr<Sequence> make_seq(int64_t request, int64_t prompt_len, int64_t forks = 0) {
  auto s = std::make_unique<Sequence>();
  s->request = request;
  for (int64_t i = 0; i < prompt_len; ++i) s->tokens.push_back(static_cast<int32_t>(i % 7));
  s->prompt_len = prompt_len;
  s->pending_forks = forks;
  return s;
}

// Drives the scheduler like the run loop: every sequence generates `max_new` tokens. Checks the
// limits every step and returns the number of steps.
struct Driver {
  Scheduler& sched;
  SchedulerLimits limits;
  int64_t max_new;
  std::map<int64_t, int64_t> finished_tokens;  // request*100+sample -> generated
  int64_t steps = 0;
  int64_t max_running_seen = 0;

  void run() {
    while (!sched.idle()) {
      StepPlan plan = sched.schedule();
      ASSERT_FALSE(plan.empty()) << "no progress at step " << steps;
      ASSERT_LE(plan.num_tokens, limits.max_tokens);
      ASSERT_LE(sched.num_running(), limits.max_seqs);
      max_running_seen = std::max(max_running_seen, sched.num_running());
      std::set<int32_t> blocks_in_step;
      for (const auto& c : plan.chunks) {
        ASSERT_GE(static_cast<int64_t>(c.seq->block_table.size()) * limits.block_size, c.start + c.count);
      }
      std::vector<Sequence*> done;
      for (const auto& c : plan.chunks) {
        sched.completed(c);
        if (!c.wants_logits) continue;
        std::vector<Sequence*> samples = {c.seq};
        if (c.seq->pending_forks > 0) {
          auto forks = sched.fork(c.seq);
          samples.insert(samples.end(), forks.begin(), forks.end());
        }
        for (Sequence* s : samples) {
          sched.append(s, static_cast<int32_t>(100 + s->num_generated()));
          if (s->num_generated() >= max_new) done.push_back(s);
        }
      }
      for (Sequence* s : done) {
        auto owned = sched.finish(s);
        finished_tokens[owned->request * 100 + owned->sample] = owned->num_generated();
      }
      ++steps;
      ASSERT_LT(steps, 100000) << "scheduler does not terminate";
    }
    EXPECT_EQ(sched.blocks().num_used(), 0) << "blocks leaked";
  }
};

TEST(BlockManager, AllocateReleaseAndShare) {
  BlockManager bm(4);
  std::vector<int32_t> a, b;
  bm.allocate(3, a);
  EXPECT_EQ(a, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(bm.num_free(), 1);
  bm.share(a);
  b = a;
  bm.release(a);
  EXPECT_EQ(bm.num_free(), 1) << "shared blocks stay in use while referenced";
  bm.release(b);
  EXPECT_EQ(bm.num_free(), 4);
  EXPECT_FALSE(bm.can_allocate(5));
}

TEST(Scheduler, PromptExactlyFillingABlockGetsOneBlockThenASecondForItsFirstToken) {
  SchedulerLimits lim{4, 64, 8};
  Scheduler s(lim, 4);
  Sequence* seq = s.add(make_seq(0, 8));
  StepPlan p = s.schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].count, 8);
  EXPECT_TRUE(p.chunks[0].wants_logits);
  EXPECT_EQ(seq->block_table.size(), 1u);
  s.completed(p.chunks[0]);
  s.append(seq, 5);
  p = s.schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].start, 8);
  EXPECT_EQ(p.chunks[0].count, 1);
  EXPECT_EQ(seq->block_table.size(), 2u);
}

TEST(Scheduler, RespectsMaxSeqsAndMaxTokensAndChunksLongPrompts) {
  SchedulerLimits lim{3, 10, 4};
  Scheduler s(lim, 64);
  for (int r = 0; r < 7; ++r) s.add(make_seq(r, 1 + 9 * (r % 3)));  // prompts of 1, 10, 19 tokens
  Driver d{s, lim, 5, {}, 0, 0};
  d.run();
  EXPECT_EQ(d.finished_tokens.size(), 7u);
  for (auto [k, n] : d.finished_tokens) EXPECT_EQ(n, 5) << k;
  EXPECT_EQ(d.max_running_seen, 3);
}

TEST(Scheduler, PreemptsNewestWhenBlocksRunOutAndStillFinishesEverything) {
  SchedulerLimits lim{8, 64, 4};
  Scheduler s(lim, 10);  // 40 token slots for 8 sequences that each grow to 3 + 12 = 15 tokens
  for (int r = 0; r < 8; ++r) s.add(make_seq(r, 3));
  Driver d{s, lim, 12, {}, 0, 0};
  d.run();
  EXPECT_EQ(d.finished_tokens.size(), 8u);
  EXPECT_GT(s.num_preemptions(), 0);
}

TEST(Scheduler, AllSequencesFinishingInTheSameStep) {
  SchedulerLimits lim{4, 64, 4};
  Scheduler s(lim, 16);
  for (int r = 0; r < 4; ++r) s.add(make_seq(r, 5));
  Driver d{s, lim, 3, {}, 0, 0};
  d.run();
  EXPECT_EQ(d.steps, 3) << "one prefill step and two decode steps for all four together";
  EXPECT_EQ(d.finished_tokens.size(), 4u);
}

TEST(Scheduler, ForksShareFullPrefillBlocksAndCopyThePartialOne) {
  SchedulerLimits lim{8, 64, 4};
  Scheduler s(lim, 16);
  Sequence* first = s.add(make_seq(0, 10, 2));  // n = 3: two forks
  StepPlan p = s.schedule();
  s.completed(p.chunks[0]);
  auto forks = s.fork(first);
  ASSERT_EQ(forks.size(), 2u);
  EXPECT_EQ(forks[0]->sample, 1);
  EXPECT_EQ(forks[1]->sample, 2);
  // 10 tokens = 2 full blocks shared by all three, plus each sample's own copy of the third.
  EXPECT_EQ(s.blocks().num_used(), 3 + 2);
  EXPECT_EQ(forks[0]->block_table[0], first->block_table[0]);
  EXPECT_NE(forks[0]->block_table[2], first->block_table[2]);
  EXPECT_EQ(s.blocks().ref_count(first->block_table[0]), 3);
  StepPlan next = s.schedule();
  ASSERT_EQ(next.block_copies.size(), 2u);
  EXPECT_EQ(next.block_copies[0].first, first->block_table[2]);
}

TEST(Scheduler, ForkedRequestRunsToTheEndWithSmallCache) {
  SchedulerLimits lim{4, 16, 4};
  Scheduler s(lim, 9);
  s.add(make_seq(0, 6, 3));
  s.add(make_seq(1, 2, 1));
  Driver d{s, lim, 8, {}, 0, 0};
  d.run();
  EXPECT_EQ(d.finished_tokens.size(), 6u);
}

}  // namespace
}  // namespace dilu
