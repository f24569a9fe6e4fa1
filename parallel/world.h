// Where this process sits: world rank and size, node index and count, local rank on the node.
// Read from MPI (never from Slurm variables); a process started without a launcher is a world
// of one. A small value type: later issues derive the TP/PP/DP groups from it.
#pragma once

#include <string>

namespace dilu {

struct World {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  // rank among the processes of this node
  int local_size = 1;
  int node = 0;        // node index, 0..num_nodes-1, in order of the lowest world rank on it
  int num_nodes = 1;
  std::string hostname;
  bool is_root() const { return rank == 0; }
  std::string str() const;
};

// Initializes MPI once per process (thread level FUNNELED) and finalizes it at exit.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  const World& world() const { return world_; }
  // Ends every rank after a fatal error on one, so that no rank hangs waiting for it.
  [[noreturn]] static void abort(int exit_code);

 private:
  World world_;
};

}  // namespace dilu
