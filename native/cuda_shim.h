/* The CUDA driver, resolved at run time: the library and the benchmark are linked with no CUDA toolkit
   (Triton's bundled cuda.h suffices) and load on machines without a driver.

   cuda_shim.c defines the cu* functions that fastfeat's code and the generated launchers call, each
   forwarding to the same symbol of libcuda.so.1, opened with dlopen on first use. The definitions are
   hidden (-fvisibility=hidden), so they never interpose on the real libcuda that torch loads. */
#pragma once
#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Opens libcuda.so.1 (or $FASTFEAT_CUDA_DRIVER) and calls cuInit(0), once per process. Returns
   CUDA_SUCCESS, CUDA_ERROR_SHARED_OBJECT_INIT_FAILED when the library or one of its symbols is missing
   (ff_cuda_driver_error() says which), or cuInit's error (e.g. CUDA_ERROR_NO_DEVICE). */
CUresult ff_cuda_load(void);
/* A readable reason for the last ff_cuda_load failure ("" when it succeeded). */
const char *ff_cuda_driver_error(void);

#ifdef __cplusplus
}
#endif
