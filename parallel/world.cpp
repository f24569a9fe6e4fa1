// MPI start-up and the World value type (see world.h).
#include "parallel/world.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

#include "kernels/error.h"
#include "parallel/mpi_check.h"


namespace dilu {

std::string World::str() const {
  std::ostringstream os;
  os << "rank " << rank << "/" << size << " (node " << node << "/" << num_nodes << ", local " << local_rank << "/"
     << local_size << ", host " << hostname << ")";
  return os.str();
}

MpiSession::MpiSession(int* argc, char*** argv) {
  // Started without a launcher, Open MPI's singleton would pin this process to one core and
  // leave the CPU backend's threads fighting over it; a lone process keeps every core it has.
  const bool launched = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK") ||
                        std::getenv("PMI_SIZE");
  if (!launched) setenv("OMPI_MCA_hwloc_base_binding_policy", "none", 0);
  int provided = 0;
  DILU_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  DILU_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_.rank));
  DILU_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_.size));
  MPI_Comm node_comm;
  DILU_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_.rank, MPI_INFO_NULL, &node_comm));
  DILU_MPI_CHECK(MPI_Comm_rank(node_comm, &world_.local_rank));
  DILU_MPI_CHECK(MPI_Comm_size(node_comm, &world_.local_size));
  // Node index: the local-rank-0 processes, in world-rank order, number the nodes.
  MPI_Comm leaders;
  DILU_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, world_.local_rank == 0 ? 0 : MPI_UNDEFINED, world_.rank, &leaders));
  int node = 0, num_nodes = 0;
  if (world_.local_rank == 0) {
    DILU_MPI_CHECK(MPI_Comm_rank(leaders, &node));
    DILU_MPI_CHECK(MPI_Comm_size(leaders, &num_nodes));
    DILU_MPI_CHECK(MPI_Comm_free(&leaders));
  }
  DILU_MPI_CHECK(MPI_Bcast(&node, 1, MPI_INT, 0, node_comm));
  DILU_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &num_nodes, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  DILU_MPI_CHECK(MPI_Comm_free(&node_comm));
  world_.node = node;
  world_.num_nodes = num_nodes;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  world_.hostname = host;
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiSession::abort(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

}  // namespace dilu
