// Collectives and point-to-point transfers over one group of ranks (a TP, PP or DP group, or
// the world). The engine talks to this interface only; MPI implements it for the CPU backend
// (NCCL will for the CUDA backend, on device memory).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/tensor.h"

namespace dilu {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Element-wise sum over the group, in place, on a tensor of this rank's backend.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // recv [size, n] = every rank's send [n], in rank order.
  virtual void all_gather(const Tensor& send, Tensor& recv) = 0;
  // Bytes from `root` to everyone (host memory).
  virtual void broadcast(std::vector<uint8_t>& bytes, int root) = 0;
  virtual int64_t sum(int64_t v) = 0;
  // Point to point (pipeline stages): a tensor of known shape, or bytes of any length.
  virtual void send(const Tensor& t, int dst) = 0;
  virtual void recv(Tensor& t, int src) = 0;
  virtual void send_bytes(const std::vector<uint8_t>& bytes, int dst) = 0;
  virtual void recv_bytes(std::vector<uint8_t>& bytes, int src) = 0;
  virtual void barrier() = 0;
};

// A group of one: every collective is the identity.
std::unique_ptr<Communicator> make_self_communicator();

}  // namespace dilu
