/* See cuda_shim.h. */
#define _GNU_SOURCE
#include "cuda_shim.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* cuda.h maps many names to versioned symbols (cuMemAlloc -> cuMemAlloc_v2): stringifying the macro
   gives the symbol to look up, and the definitions below get the versioned names too. */
#define FF_STR_(x) #x
#define FF_STR(x) FF_STR_(x)

/* name, (parameters), (arguments) */
#define FF_CU_FUNCTIONS(X)                                                                                   \
  X(cuDriverGetVersion, (int *v), (v))                                                                       \
  X(cuDeviceGet, (CUdevice * d, int ordinal), (d, ordinal))                                                  \
  X(cuDeviceGetCount, (int *n), (n))                                                                         \
  X(cuDeviceGetName, (char *name, int len, CUdevice d), (name, len, d))                                      \
  X(cuDeviceGetAttribute, (int *v, CUdevice_attribute a, CUdevice d), (v, a, d))                             \
  X(cuDevicePrimaryCtxRetain, (CUcontext * c, CUdevice d), (c, d))                                           \
  X(cuDevicePrimaryCtxRelease, (CUdevice d), (d))                                                            \
  X(cuCtxGetCurrent, (CUcontext * c), (c))                                                                   \
  X(cuCtxSetCurrent, (CUcontext c), (c))                                                                     \
  X(cuCtxGetDevice, (CUdevice * d), (d))                                                                     \
  X(cuCtxSynchronize, (void), ())                                                                            \
  X(cuModuleLoadData, (CUmodule * m, const void *image), (m, image))                                         \
  X(cuModuleUnload, (CUmodule m), (m))                                                                       \
  X(cuModuleGetFunction, (CUfunction * f, CUmodule m, const char *name), (f, m, name))                       \
  X(cuFuncSetCacheConfig, (CUfunction f, CUfunc_cache c), (f, c))                                            \
  X(cuFuncSetAttribute, (CUfunction f, CUfunction_attribute a, int v), (f, a, v))                            \
  X(cuLaunchKernel,                                                                                          \
    (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,             \
     unsigned shared, CUstream s, void **params, void **extra),                                              \
    (f, gx, gy, gz, bx, by, bz, shared, s, params, extra))                                                   \
  X(cuMemAlloc, (CUdeviceptr * p, size_t bytes), (p, bytes))                                                 \
  X(cuMemFree, (CUdeviceptr p), (p))                                                                         \
  X(cuMemcpyHtoD, (CUdeviceptr dst, const void *src, size_t bytes), (dst, src, bytes))                       \
  X(cuMemcpyDtoH, (void *dst, CUdeviceptr src, size_t bytes), (dst, src, bytes))                             \
  X(cuMemsetD8, (CUdeviceptr p, unsigned char v, size_t n), (p, v, n))                                       \
  X(cuStreamCreate, (CUstream * s, unsigned int flags), (s, flags))                                          \
  X(cuStreamDestroy, (CUstream s), (s))                                                                      \
  X(cuStreamSynchronize, (CUstream s), (s))                                                                  \
  X(cuEventCreate, (CUevent * e, unsigned int flags), (e, flags))                                            \
  X(cuEventDestroy, (CUevent e), (e))                                                                        \
  X(cuEventRecord, (CUevent e, CUstream s), (e, s))                                                          \
  X(cuEventSynchronize, (CUevent e), (e))                                                                    \
  X(cuEventElapsedTime, (float *ms, CUevent a, CUevent b), (ms, a, b))                                       \
  X(cuGetErrorName, (CUresult r, const char **s), (r, s))                                                    \
  X(cuGetErrorString, (CUresult r, const char **s), (r, s))

#define FF_DECLARE(name, params, args) static CUresult(CUDAAPI *p_##name) params;
FF_CU_FUNCTIONS(FF_DECLARE)
static CUresult(CUDAAPI *p_cuInit)(unsigned int);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static CUresult load_result = CUDA_ERROR_NOT_INITIALIZED;
static char load_error[512];

/* The versioned symbol first (what cuda.h asks for), then the plain name: a driver older than the
   bundled header may lack the newest version of a call (cuEventElapsedTime_v2 is 12.8+). */
static void *lookup(void *lib, const char *versioned, const char *plain) {
  void *sym = dlsym(lib, versioned);
  return sym ? sym : dlsym(lib, plain);
}

static void load_once(void) {
  const char *path = getenv("FASTFEAT_CUDA_DRIVER");
  if (!path || !*path) path = "libcuda.so.1";
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(load_error, sizeof load_error, "cannot open the CUDA driver library %s: %s", path, dlerror());
    load_result = CUDA_ERROR_SHARED_OBJECT_INIT_FAILED;
    return;
  }
  p_cuInit = (CUresult(CUDAAPI *)(unsigned int))dlsym(lib, "cuInit");
#define FF_RESOLVE(name, params, args) p_##name = (CUresult(CUDAAPI *) params)lookup(lib, FF_STR(name), #name);
  FF_CU_FUNCTIONS(FF_RESOLVE)
  if (!p_cuInit || !p_cuLaunchKernel || !p_cuModuleLoadData || !p_cuCtxGetCurrent) {
    snprintf(load_error, sizeof load_error, "%s lacks the CUDA driver API entry points fastfeat needs", path);
    load_result = CUDA_ERROR_SHARED_OBJECT_INIT_FAILED;
    return;
  }
  load_result = p_cuInit(0);
  if (load_result != CUDA_SUCCESS)
    snprintf(load_error, sizeof load_error, "cuInit failed with CUDA error %d (no usable GPU?)", (int)load_result);
}

CUresult ff_cuda_load(void) {
  pthread_once(&once, load_once);
  return load_result;
}

const char *ff_cuda_driver_error(void) {
  ff_cuda_load();
  return load_error;
}

/* Every wrapper fails cleanly (never calls through a NULL pointer) when the driver is absent. */
#define FF_DEFINE(name, params, args)                                  \
  CUresult CUDAAPI name params {                                       \
    if (ff_cuda_load() != CUDA_SUCCESS) return CUDA_ERROR_NOT_INITIALIZED; \
    if (!p_##name) return CUDA_ERROR_NOT_FOUND;                        \
    return p_##name args;                                              \
  }
FF_CU_FUNCTIONS(FF_DEFINE)
