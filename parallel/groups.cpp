// MPI communicators for the parallel layout (see groups.h and communicator.h).
#include "parallel/groups.h"

#include <mpi.h>

#include <cstring>

#include "kernels/error.h"
#include "parallel/mpi_check.h"


namespace dilu {

namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(Tensor&) override {}
  void all_gather(const Tensor& send, Tensor& recv) override {
    DILU_CHECK(send.nbytes() == recv.nbytes(), "all_gather sizes");
    std::memcpy(recv.raw(), send.raw(), send.nbytes());
  }
  void broadcast(std::vector<uint8_t>&, int) override {}
  int64_t sum(int64_t v) override { return v; }
  void barrier() override {}
  void send(const Tensor&, int) override { DILU_CHECK(false, "send within a group of one"); }
  void recv(Tensor&, int) override { DILU_CHECK(false, "recv within a group of one"); }
  void send_bytes(const std::vector<uint8_t>&, int) override { DILU_CHECK(false, "send within a group of one"); }
  void recv_bytes(std::vector<uint8_t>&, int) override { DILU_CHECK(false, "recv within a group of one"); }
};

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    DILU_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DILU_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(Tensor& t) override {
    DILU_CHECK(t.is_cpu() && t.dtype() == DType::F32, "MPI all-reduce takes F32 host tensors");
    DILU_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.raw(), static_cast<int>(t.numel()), MPI_FLOAT, MPI_SUM, comm_));
  }
  void all_gather(const Tensor& send, Tensor& recv) override {
    DILU_CHECK(send.is_cpu() && recv.is_cpu() && send.dtype() == DType::F32 && recv.dtype() == DType::F32 &&
                   recv.numel() == send.numel() * size_,
               "MPI all-gather takes F32 host tensors of matching sizes");
    DILU_MPI_CHECK(MPI_Allgather(send.raw(), static_cast<int>(send.numel()), MPI_FLOAT, recv.raw(),
                                 static_cast<int>(send.numel()), MPI_FLOAT, comm_));
  }
  void broadcast(std::vector<uint8_t>& bytes, int root) override {
    uint64_t n = bytes.size();
    DILU_MPI_CHECK(MPI_Bcast(&n, 1, MPI_UINT64_T, root, comm_));
    bytes.resize(n);
    if (n) DILU_MPI_CHECK(MPI_Bcast(bytes.data(), static_cast<int>(n), MPI_BYTE, root, comm_));
  }
  int64_t sum(int64_t v) override {
    DILU_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT64_T, MPI_SUM, comm_));
    return v;
  }
  void barrier() override { DILU_MPI_CHECK(MPI_Barrier(comm_)); }
  void send(const Tensor& t, int dst) override {
    DILU_CHECK(t.is_cpu(), "MPI send takes host tensors");
    DILU_MPI_CHECK(MPI_Send(t.raw(), static_cast<int>(t.nbytes()), MPI_BYTE, dst, kTensorTag, comm_));
  }
  void recv(Tensor& t, int src) override {
    DILU_CHECK(t.is_cpu(), "MPI recv takes host tensors");
    DILU_MPI_CHECK(MPI_Recv(t.raw(), static_cast<int>(t.nbytes()), MPI_BYTE, src, kTensorTag, comm_, MPI_STATUS_IGNORE));
  }
  void send_bytes(const std::vector<uint8_t>& bytes, int dst) override {
    DILU_MPI_CHECK(MPI_Send(bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, dst, kBytesTag, comm_));
  }
  void recv_bytes(std::vector<uint8_t>& bytes, int src) override {
    MPI_Status st;
    DILU_MPI_CHECK(MPI_Probe(src, kBytesTag, comm_, &st));
    int n = 0;
    DILU_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &n));
    bytes.resize(static_cast<size_t>(n));
    DILU_MPI_CHECK(MPI_Recv(bytes.data(), n, MPI_BYTE, src, kBytesTag, comm_, MPI_STATUS_IGNORE));
  }

 private:
  static constexpr int kTensorTag = 11, kBytesTag = 12;
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() { return std::make_unique<SelfCommunicator>(); }

ParallelGroups make_parallel_groups(const World& world, int tp, int pp, int dp) {
  DILU_USER_CHECK(tp >= 1 && pp >= 1 && dp >= 1 && tp * pp * dp == world.size, "parallel.tp x parallel.pp x "
                  "parallel.dp = ", tp, " x ", pp, " x ", dp, " = ", tp * pp * dp, " ranks, but dilu was launched with ",
                  world.size, "; choose them so that their product equals the number of ranks (mpirun -np N)");
  ParallelGroups g;
  g.world = world;
  g.tp = tp;
  g.pp = pp;
  g.dp = dp;
  g.tp_rank = world.rank % tp;
  g.pp_rank = world.rank / tp % pp;
  g.dp_rank = world.rank / (tp * pp);
  if (world.size == 1) {
    g.tp_comm = make_self_communicator();
    g.pp_comm = make_self_communicator();
    g.replica_comm = make_self_communicator();
    g.world_comm = make_self_communicator();
    return g;
  }
  MPI_Comm tp_comm, pp_comm, replica_comm;
  DILU_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, g.dp_rank * pp + g.pp_rank, g.tp_rank, &tp_comm));
  DILU_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, g.dp_rank * tp + g.tp_rank, g.pp_rank, &pp_comm));
  DILU_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, g.dp_rank, g.pp_rank * tp + g.tp_rank, &replica_comm));
  g.tp_comm = std::make_unique<MpiCommunicator>(tp_comm);
  g.pp_comm = std::make_unique<MpiCommunicator>(pp_comm);
  g.replica_comm = std::make_unique<MpiCommunicator>(replica_comm);
  g.world_comm = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
  return g;
}

}  // namespace dilu
