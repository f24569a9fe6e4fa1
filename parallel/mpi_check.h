// Every MPI call goes through this check: a failure is a broken invariant (MPI's default error
// handler aborts first in practice), reported with the call and its error code.
#pragma once

#include "kernels/error.h"

#define DILU_MPI_CHECK(call)                                                               \
  do {                                                                                     \
    int dilu_mpi_rc = (call);                                                              \
    DILU_CHECK(dilu_mpi_rc == MPI_SUCCESS, #call, " failed with MPI error ", dilu_mpi_rc); \
  } while (0)
