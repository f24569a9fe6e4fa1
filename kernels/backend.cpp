// Chooses the op backend by name.
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#ifdef DILU_HAVE_CUDA
#include "kernels/cuda/cuda_info.h"
#include "kernels/cuda/cuda_ops.h"
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

std::optional<LocalGpu> local_gpu() {
#ifdef DILU_HAVE_CUDA
  LocalGpu g;
  if (cuda::current_device_memory(&g.name, &g.free_bytes, &g.total_bytes)) return g;
#endif
  return std::nullopt;
}

std::unique_ptr<Ops> make_ops(const std::string& backend, const BackendOptions& options) {
#ifdef DILU_HAVE_CUDA
  if (backend == "cuda" || (backend == "auto" && cuda::device_count() > 0)) return make_cuda_ops(options);
#else
  if (backend == "cuda")
    throw UserError("backend 'cuda': this dilu was built without CUDA (configure with -DDILU_CUDA=ON on a machine with "
                    "the CUDA toolkit), or use --set backend=cpu");
#endif
  if (backend == "cpu" || backend == "auto") return make_cpu_ops(options.cpu_threads, options.fp8_gemm == "block");
  throw UserError("unknown backend '" + backend + "'; choose cpu, cuda or auto");
}

}  // namespace dilu
