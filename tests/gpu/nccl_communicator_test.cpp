// GPU tests (label "gpu"): an NCCL communicator over a group of one (all-reduce is the identity,
// all-gather a copy, host operations go through the group), and setup with a peer that never
// joins fails within its timeout instead of hanging.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/tensor.h"
#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"

namespace dilu {
namespace {

bool have_cuda_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A device tensor holding `values` (elements of `dtype`, given as their raw host representation).
template <class T>
Tensor device_tensor(DType dtype, Shape shape, const std::vector<T>& values) {
  void* ptr = nullptr;
  EXPECT_EQ(cudaMalloc(&ptr, values.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(ptr, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  std::shared_ptr<const void> keep(ptr, [](const void* p) { cudaFree(const_cast<void*>(p)); });
  return Tensor(ptr, dtype, std::move(shape), Device{DeviceKind::CUDA, 0}, std::move(keep));
}

template <class T>
std::vector<T> to_host(const Tensor& t) {
  std::vector<T> out(static_cast<size_t>(t.numel()));
  EXPECT_EQ(cudaMemcpy(out.data(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

class NcclCommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device visible; NCCL tests need one";
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

TEST_F(NcclCommunicatorTest, GroupOfOne) {
  auto group = make_self_communicator();
  NcclOptions opts;
  opts.timeout_s = 120;
  std::unique_ptr<Communicator> comm = make_nccl_communicator(*group, stream_, opts);
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);

  // All-reduce over one rank: the identity, in F32 and BF16.
  const std::vector<float> f = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, -7.0f};
  Tensor tf = device_tensor(DType::F32, {2, 3}, f);
  comm->all_reduce_sum(tf);
  std::vector<uint16_t> b;
  for (float x : f) b.push_back(f32_to_bf16(x));
  Tensor tb = device_tensor(DType::BF16, {6}, b);
  comm->all_reduce_sum(tb);

  // All-gather over one rank: recv [1, n] = send [n].
  const std::vector<float> g = {4.0f, 5.0f, 6.0f, 7.0f, 8.0f};
  Tensor send = device_tensor(DType::F32, {5}, g);
  Tensor recv = device_tensor(DType::F32, {1, 5}, std::vector<float>(5, -1.0f));
  comm->all_gather(send, recv);

  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  EXPECT_NO_THROW(nccl_check_async_errors());
  EXPECT_EQ(to_host<float>(tf), f);
  EXPECT_EQ(to_host<uint16_t>(tb), b);
  EXPECT_EQ(to_host<float>(recv), g);

  // Host operations go through the group.
  EXPECT_EQ(comm->sum(42), 42);
  std::vector<uint8_t> bytes = {1, 2, 3};
  comm->broadcast(bytes, 0);
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 2, 3}));
  comm->barrier();

  // Host tensors, other dtypes and mismatched sizes are bugs in the caller.
  Tensor host = Tensor::host(DType::F32, {4});
  EXPECT_THROW(comm->all_reduce_sum(host), std::logic_error);
  Tensor ints = device_tensor(DType::I32, {2}, std::vector<int32_t>{1, 2});
  EXPECT_THROW(comm->all_reduce_sum(ints), std::logic_error);
  Tensor short_recv = device_tensor(DType::F32, {4}, std::vector<float>(4, 0.0f));
  EXPECT_THROW(comm->all_gather(send, short_recv), std::logic_error);
  EXPECT_THROW(comm->send(send, 0), std::logic_error);  // no peer in a group of one

  EXPECT_NO_THROW(nccl_check_async_errors());
  comm.reset();
  EXPECT_NO_THROW(nccl_check_async_errors());
}

// Claims two ranks but is alone: its peer never joins the NCCL communicator.
class LonelyGroup final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  void all_reduce_sum(Tensor&) override {}
  void all_gather(const Tensor&, Tensor&) override {}
  void broadcast(std::vector<uint8_t>&, int) override {}
  int64_t sum(int64_t v) override { return v; }
  void send(const Tensor&, int) override {}
  void recv(Tensor&, int) override {}
  void send_bytes(const std::vector<uint8_t>&, int) override {}
  void recv_bytes(std::vector<uint8_t>&, int) override {}
  void barrier() override {}
};

TEST_F(NcclCommunicatorTest, SetupWithAMissingPeerTimesOut) {
  LonelyGroup group;
  NcclOptions opts;
  opts.timeout_s = 3;
  try {
    make_nccl_communicator(group, stream_, opts);
    FAIL() << "setup with a missing peer succeeded";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("NCCL"), std::string::npos) << what;
    EXPECT_NE(what.find("group of 2 ranks, rank 0"), std::string::npos) << what;
  }
  EXPECT_NO_THROW(nccl_check_async_errors());  // the failed communicator was never live
}

}  // namespace
}  // namespace dilu
