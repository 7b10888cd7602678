/* backend.c - which compute backends this build has and whether a GPU can be used now.
 * A binary built with CUDA still starts and runs on the CPU where no driver exists. */
#include "kvc/backend.h"

#include <stdio.h>

#ifdef KVC_HAVE_CUDA
int cuda_device_info(char *desc, size_t cap); /* kernels/cuda/ops_cuda.cu */
#endif

int backend_cuda_compiled(void) {
#ifdef KVC_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int backend_cuda_available(char *desc, size_t cap) {
#ifdef KVC_HAVE_CUDA
    return cuda_device_info(desc, cap);
#else
    if (desc && cap) snprintf(desc, cap, "this build has no CUDA backend");
    return 0;
#endif
}
