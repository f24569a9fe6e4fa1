// The CUDA backend's Communicator: NCCL over the ranks of an MPI group (TP or PP), on device
// tensors, enqueued on the backend's stream. Built only with the CUDA backend (DILU_HAVE_CUDA).
//
// Failures never hang a rank: the communicator is non-blocking, setup and every enqueue are bounded
// by NcclOptions::timeout_s, and nccl_check_async_errors() (called by the backend while it waits
// for its stream) aborts every live NCCL communicator and throws when one reports an asynchronous
// error or has had work outstanding for longer than its timeout.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace dilu {

struct NcclOptions {
  // How long setup, one enqueue, or one operation in flight may take before the communicators
  // are aborted and the run fails (a peer that died or never joined).
  double timeout_s = 600;
};

// A communicator over the same ranks as `group` (an MPI communicator of the TP or PP group), for
// device tensors: rank 0 of the group makes the ncclUniqueId and broadcasts it over `group`, which
// must outlive the result. Bound to the CUDA device current at the call; every rank of the group
// calls this together. Collectives and send/recv are enqueued on `stream` (a cudaStream_t; null is
// the default stream) without host synchronization: tensors must stay alive until the stream has
// run them. Host-memory operations (broadcast of bytes, sum, send_bytes/recv_bytes, barrier) go
// over `group`. all_reduce_sum takes F32 or BF16; all_gather and send/recv take any dtype.
// Throws std::runtime_error when NCCL cannot be set up within the timeout.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& group, void* stream, NcclOptions opts = {});

// Throws std::runtime_error (naming the NCCL error, the group size and rank, and what to check)
// when a live NCCL communicator reports an asynchronous error, or has had an operation outstanding
// for longer than its timeout; every live NCCL communicator is aborted first (ncclCommAbort), so
// that the stream drains instead of hanging. A communicator aborted this way stays failed: later
// calls on it, and later checks, throw again. Cheap when nothing is wrong; thread-safe.
void nccl_check_async_errors();

}  // namespace dilu
