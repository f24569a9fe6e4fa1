// Chooses the op backend by name.
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#ifdef DILU_HAVE_CUDA
#include "kernels/cuda/cuda_info.h"
#endif

namespace dilu {

int bind_local_device(int local_rank) {
#ifdef DILU_HAVE_CUDA
  return cuda::bind_device(local_rank);
#else
  (void)local_rank;
  return -1;
#endif
}

std::unique_ptr<Ops> make_ops(const std::string& backend, int cpu_threads) {
  if (backend == "cpu" || backend == "auto") return make_cpu_ops(cpu_threads);
  if (backend == "cuda")
    throw UserError(
        "backend 'cuda': the CUDA backend's ops are not implemented yet in this build; use --set backend=cpu");
  throw UserError("unknown backend '" + backend + "'; choose cpu, cuda or auto");
}

}  // namespace dilu
