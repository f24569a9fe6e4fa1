// The parallel layout of a run: tp × pp × dp ranks, TP ranks adjacent (and so inside one node
// when tp divides the ranks per node), then PP stages, then DP replicas:
//   world rank = (dp_rank × pp + pp_rank) × tp + tp_rank.
// One communicator per group, split from MPI_COMM_WORLD.
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/world.h"

namespace dilu {

struct ParallelGroups {
  World world;
  int tp = 1, pp = 1, dp = 1;
  int tp_rank = 0, pp_rank = 0, dp_rank = 0;
  std::unique_ptr<Communicator> tp_comm;       // ranks of my TP group (same stage, same replica)
  std::unique_ptr<Communicator> pp_comm;       // my counterparts in the other stages (same TP rank); rank = stage
  std::unique_ptr<Communicator> replica_comm;  // every rank of my replica (tp × pp); rank 0 schedules
  std::unique_ptr<Communicator> world_comm;  // everyone
  // The rank of a replica that schedules, reads input and writes output.
  bool is_replica_root() const { return tp_rank == 0 && pp_rank == 0; }
};

// Throws UserError when tp × pp × dp differs from the world size.
ParallelGroups make_parallel_groups(const World& world, int tp, int pp, int dp);

}  // namespace dilu
