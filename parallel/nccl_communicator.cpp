// NCCL communicators for the CUDA backend (see nccl_communicator.h).
//
// Every communicator is non-blocking (ncclConfig_t::blocking = 0): setup and each enqueue return at
// once, possibly with ncclInProgress, and we poll ncclCommGetAsyncError until they are done, never
// past the timeout. Work on the device is tracked with one CUDA event per enqueued operation; the
// oldest incomplete one says since when this communicator has had work outstanding. One mutex
// guards every communicator of the process, so that no NCCL call is in flight on a communicator
// while another thread aborts it (NCCL requires that).
#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/error.h"

namespace dilu {

namespace {

using Clock = std::chrono::steady_clock;

// What to look at for each kind of NCCL failure.
const char* what_to_check(ncclResult_t r) {
  switch (r) {
    case ncclUnhandledCudaError:
      return "a CUDA call inside NCCL failed: check the GPU and its driver (nvidia-smi) and that each rank of the "
             "group has a GPU of its own";
    case ncclSystemError:
      return "a system call or the network failed: check that every rank of the group is still running, that the "
             "nodes reach each other over the interfaces NCCL uses (NCCL_SOCKET_IFNAME, NCCL_IB_HCA; NCCL_DEBUG=INFO "
             "shows them), and that /dev/shm is large enough";
    case ncclRemoteError:
      return "a peer rank failed or went away: look for the first error in the other ranks' logs";
    case ncclInternalError:
      return "NCCL reported an internal error: rerun with NCCL_DEBUG=INFO and report it";
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return "dilu called NCCL wrongly: this is a bug in dilu; please report it with the command line that "
             "triggered it (NCCL_DEBUG=WARN says more)";
    default:
      return "rerun with NCCL_DEBUG=INFO to see what NCCL did";
  }
}

constexpr const char* kPeerHint =
    "check that every rank of the group is still running and reaches the same operations in the same order (a rank "
    "that failed earlier leaves its peers waiting: look for the first error in the other ranks' logs), and that the "
    "nodes reach each other over the interfaces NCCL uses (NCCL_SOCKET_IFNAME, NCCL_IB_HCA; NCCL_DEBUG=INFO shows "
    "them)";

// Polls the communicator's state while it is ncclInProgress, until `deadline`. Returns the state
// it reached (or the polling call's own error), ncclInProgress when the deadline passed first.
ncclResult_t wait_while_in_progress(ncclComm_t comm, Clock::time_point deadline) {
  const Clock::time_point start = Clock::now();
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    const Clock::time_point now = Clock::now();
    if (now >= deadline) return ncclInProgress;
    // Most enqueues finish within microseconds; setup and first connections take longer.
    if (now - start < std::chrono::milliseconds(2)) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

class NcclCommunicator;

// Every NCCL communicator of the process and the registry of live ones.
std::mutex& nccl_mutex() {
  static std::mutex m;
  return m;
}
std::vector<NcclCommunicator*>& live_communicators() {
  static std::vector<NcclCommunicator*> live;
  return live;
}

[[noreturn]] void abort_all_and_throw(const std::string& reason);

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& group, void* stream, NcclOptions opts)
      : group_(group), stream_(static_cast<cudaStream_t>(stream)), opts_(opts), rank_(group.rank()),
        size_(group.size()) {
    DILU_CHECK(opts_.timeout_s > 0, "the NCCL timeout must be positive, not ", opts_.timeout_s);
    opts_.timeout_s = std::min(opts_.timeout_s, 1e9);  // stays representable as a Clock duration
    cuda_check(cudaGetDevice(&device_), "cudaGetDevice");

    // Rank 0 makes the id and sends it over the group. An empty message says that rank 0 failed, so
    // that the others throw too instead of waiting for it.
    std::vector<uint8_t> id_bytes;
    ncclResult_t id_result = ncclSuccess;
    if (rank_ == 0) {
      ncclUniqueId id{};
      id_result = ncclGetUniqueId(&id);
      if (id_result == ncclSuccess) {
        const auto* p = reinterpret_cast<const uint8_t*>(&id);
        id_bytes.assign(p, p + sizeof(id));
      }
    }
    group_.broadcast(id_bytes, 0);
    if (id_result != ncclSuccess) throw std::runtime_error(failure("ncclGetUniqueId", id_result));
    if (id_bytes.size() != sizeof(ncclUniqueId))
      throw std::runtime_error(detail::concat("NCCL setup failed (", where(), "): rank 0 of the group could not "
                                              "create the NCCL unique id; see rank 0's error"));
    ncclUniqueId id{};
    std::memcpy(&id, id_bytes.data(), sizeof(id));

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const Clock::time_point deadline = Clock::now() + timeout();
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if ((r == ncclSuccess || r == ncclInProgress) && comm_ != nullptr) r = wait_while_in_progress(comm_, deadline);
    if (r != ncclSuccess) {
      const std::string message =
          r == ncclInProgress
              ? detail::concat("NCCL setup did not finish within ", opts_.timeout_s, " s (", where(),
                               "): a peer rank never joined; ", kPeerHint)
              : failure("ncclCommInitRankConfig", r);
      if (comm_ != nullptr) (void)ncclCommAbort(comm_);
      comm_ = nullptr;
      throw std::runtime_error(message);
    }
    std::lock_guard<std::mutex> lock(nccl_mutex());
    live_communicators().push_back(this);
  }

  ~NcclCommunicator() override {
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lock(nccl_mutex());
      auto& live = live_communicators();
      live.erase(std::remove(live.begin(), live.end(), this), live.end());
      comm = std::exchange(comm_, nullptr);
    }
    // Out of the registry, nothing else reaches this communicator: no lock needed from here on.
    if (comm != nullptr) {
      // Unwinding from an error, peers may never reach their own teardown: abort, do not wait.
      bool healthy = std::uncaught_exceptions() == 0;
      ncclResult_t state = ncclSuccess;
      if (healthy)
        healthy = ncclCommGetAsyncError(comm, &state) == ncclSuccess &&
                  (state == ncclSuccess || state == ncclInProgress);
      if (healthy) {
        ncclResult_t r = ncclCommFinalize(comm);
        if (r == ncclSuccess || r == ncclInProgress) r = wait_while_in_progress(comm, Clock::now() + timeout());
        healthy = r == ncclSuccess;
      }
      if (healthy) (void)ncclCommDestroy(comm);
      else (void)ncclCommAbort(comm);
    }
    for (const Pending& p : pending_) (void)cudaEventDestroy(p.event);
    for (cudaEvent_t e : spare_events_) (void)cudaEventDestroy(e);
  }

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(Tensor& t) override {
    check_on_device(t, "all_reduce_sum");
    DILU_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16, "NCCL all_reduce_sum takes F32 or BF16 tensors, not ",
               dtype_name(t.dtype()));
    const ncclDataType_t type = t.dtype() == DType::F32 ? ncclFloat32 : ncclBfloat16;
    const auto count = static_cast<size_t>(t.numel());
    if (count == 0) return;
    void* data = t.raw();
    enqueue("ncclAllReduce", [&](ncclComm_t comm) {
      return ncclAllReduce(data, data, count, type, ncclSum, comm, stream_);
    });
  }

  void all_gather(const Tensor& send, Tensor& recv) override {
    check_on_device(send, "all_gather");
    check_on_device(recv, "all_gather");
    DILU_CHECK(send.dtype() == recv.dtype() && recv.numel() == send.numel() * size_,
               "NCCL all_gather: recv ", shape_str(recv.shape()), " ", dtype_name(recv.dtype()), " must hold ", size_,
               " x send ", shape_str(send.shape()), " ", dtype_name(send.dtype()));
    const size_t bytes = send.nbytes();
    if (bytes == 0) return;
    const void* src = send.raw();
    void* dst = recv.raw();
    enqueue("ncclAllGather", [&](ncclComm_t comm) {
      return ncclAllGather(src, dst, bytes, ncclUint8, comm, stream_);
    });
  }

  void send(const Tensor& t, int dst) override {
    check_on_device(t, "send");
    check_peer(dst, "send to");
    const size_t bytes = t.nbytes();
    if (bytes == 0) return;
    const void* data = t.raw();
    enqueue("ncclSend", [&](ncclComm_t comm) { return ncclSend(data, bytes, ncclUint8, dst, comm, stream_); });
  }

  void recv(Tensor& t, int src) override {
    check_on_device(t, "recv");
    check_peer(src, "recv from");
    const size_t bytes = t.nbytes();
    if (bytes == 0) return;
    void* data = t.raw();
    enqueue("ncclRecv", [&](ncclComm_t comm) { return ncclRecv(data, bytes, ncclUint8, src, comm, stream_); });
  }

  // Host memory: over the MPI group.
  void broadcast(std::vector<uint8_t>& bytes, int root) override { group_.broadcast(bytes, root); }
  int64_t sum(int64_t v) override { return group_.sum(v); }
  void send_bytes(const std::vector<uint8_t>& bytes, int dst) override { group_.send_bytes(bytes, dst); }
  void recv_bytes(std::vector<uint8_t>& bytes, int src) override { group_.recv_bytes(bytes, src); }
  void barrier() override { group_.barrier(); }

  // With nccl_mutex() held: empty while this communicator is healthy, else what went wrong.
  std::string poll_locked(Clock::time_point now) {
    if (comm_ == nullptr) return aborted_message();
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) return failure("ncclCommGetAsyncError", r);
    if (state != ncclSuccess && state != ncclInProgress) return failure("an NCCL operation (asynchronous error)", state);
    const cudaError_t e = retire_completed();
    if (e != cudaSuccess) return cuda_failure("cudaEventQuery on NCCL work", e);
    if (!pending_.empty() && now - pending_.front().enqueued > timeout()) {
      const double waited = std::chrono::duration<double>(now - pending_.front().enqueued).count();
      return detail::concat("an NCCL operation enqueued ", waited, " s ago has not finished (timeout ", opts_.timeout_s,
                            " s; ", where(), "): a peer rank is not taking part; ", kPeerHint);
    }
    return {};
  }

  // With nccl_mutex() held: stops everything this communicator runs, so that its stream drains.
  void abort_locked(const std::string& reason) {
    if (comm_ == nullptr) return;
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    failure_ = reason;
  }

 private:
  struct Pending {
    cudaEvent_t event;
    Clock::time_point enqueued;
  };

  Clock::duration timeout() const {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts_.timeout_s));
  }

  std::string where() const {
    return detail::concat("group of ", size_, " ranks, rank ", rank_, ", CUDA device ", device_);
  }

  std::string failure(const char* call, ncclResult_t r) const {
    const char* last = ncclGetLastError(comm_);
    return detail::concat("NCCL error in ", call, " (", where(), "): ", ncclGetErrorString(r),
                          last != nullptr && *last != '\0' ? ": " : "", last != nullptr ? last : "", "; ",
                          what_to_check(r));
  }

  std::string cuda_failure(const char* call, cudaError_t e) const {
    return detail::concat(call, " failed (", where(), "): ", cudaGetErrorName(e), ": ", cudaGetErrorString(e));
  }

  std::string aborted_message() const {
    return detail::concat("the NCCL communicator of ", where(), " was aborted after an earlier error: ", failure_);
  }

  void cuda_check(cudaError_t e, const char* call) const {
    if (e != cudaSuccess) throw std::runtime_error(cuda_failure(call, e));
  }

  static void check_on_device(const Tensor& t, const char* op) {
    DILU_CHECK(t.device().kind == DeviceKind::CUDA, "NCCL ", op, " takes device tensors, not one on ",
               t.device().str());
  }

  void check_peer(int peer, const char* what) const {
    DILU_CHECK(peer >= 0 && peer < size_ && peer != rank_, "NCCL ", what, " rank ", peer, " in a ", where());
  }

  // Enqueues one operation on the stream (`op` makes the NCCL call), waits while NCCL reports it
  // in progress (bounded by the timeout) and records an event after it. Any failure aborts every
  // NCCL communicator and throws.
  template <class Op>
  void enqueue(const char* call, Op&& op) {
    std::lock_guard<std::mutex> lock(nccl_mutex());
    if (comm_ == nullptr) throw std::runtime_error(aborted_message());
    const Clock::time_point start = Clock::now();
    ncclResult_t r = op(comm_);
    if (r == ncclInProgress) r = wait_while_in_progress(comm_, start + timeout());
    if (r == ncclInProgress)
      abort_all_and_throw(detail::concat(call, " could not be enqueued within ", opts_.timeout_s, " s (", where(),
                                         "): ", kPeerHint));
    if (r != ncclSuccess) abort_all_and_throw(failure(call, r));

    cudaEvent_t event = nullptr;
    if (spare_events_.empty()) {
      cuda_check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    } else {
      event = spare_events_.back();
      spare_events_.pop_back();
    }
    const cudaError_t e = cudaEventRecord(event, stream_);
    if (e != cudaSuccess) {
      spare_events_.push_back(event);
      throw std::runtime_error(cuda_failure("cudaEventRecord after an NCCL operation", e));
    }
    pending_.push_back({event, start});
    cuda_check(retire_completed(), "cudaEventQuery on NCCL work");
  }

  // Drops the events of finished operations (they finish in stream order) for reuse.
  cudaError_t retire_completed() {
    while (!pending_.empty()) {
      const cudaError_t e = cudaEventQuery(pending_.front().event);
      if (e == cudaErrorNotReady) return cudaSuccess;
      if (e != cudaSuccess) return e;
      spare_events_.push_back(pending_.front().event);
      pending_.pop_front();
    }
    return cudaSuccess;
  }

  Communicator& group_;
  cudaStream_t stream_;
  NcclOptions opts_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
  ncclComm_t comm_ = nullptr;  // null once aborted
  std::string failure_;        // why it was aborted
  std::deque<Pending> pending_;  // enqueued, possibly unfinished, oldest first
  std::vector<cudaEvent_t> spare_events_;
};

// With nccl_mutex() held.
void abort_all_and_throw(const std::string& reason) {
  for (NcclCommunicator* c : live_communicators()) c->abort_locked(reason);
  throw std::runtime_error(reason);
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& group, void* stream, NcclOptions opts) {
  return std::make_unique<NcclCommunicator>(group, stream, opts);
}

void nccl_check_async_errors() {
  std::lock_guard<std::mutex> lock(nccl_mutex());
  const Clock::time_point now = Clock::now();
  for (NcclCommunicator* c : live_communicators()) {
    const std::string problem = c->poll_locked(now);
    if (!problem.empty()) abort_all_and_throw(problem);
  }
}

}  // namespace dilu
