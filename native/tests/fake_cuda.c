/* A stand-in CUDA driver for ctest native_fake_driver: just enough of the driver API for
   libfastfeat_kernels to plan and "launch" on a machine with no GPU (FASTFEAT_CUDA_DRIVER points the
   library's shim at this file). It reports one sm_90 GPU with 132 SMs and a current context, accepts
   every module, and records each cuLaunchKernel -- the kernel's name, grid, and its leading pointer
   arguments -- instead of running it; the test reads the records through fake_cuda_launch(). Nothing runs,
   so it checks the C side's arithmetic (workspace sizes and refusals, grids, the counters' address), never
   numerics. Test code only: it is built beside the library but never installed or copied anywhere. */
#include <stdint.h>
#include <string.h>
#include <cuda.h>

#define FAKE_API __attribute__((visibility("default")))
#define FAKE_MAX_FUNCS 256
#define FAKE_MAX_LAUNCHES 64
#define FAKE_MAX_PTRS 6

static char func_names[FAKE_MAX_FUNCS][128];
static int num_funcs;

typedef struct {
  char name[128];
  unsigned grid[3], block, shared;
  unsigned long long ptrs[FAKE_MAX_PTRS];
  int num_ptrs;
} fake_launch_record;
static fake_launch_record launches[FAKE_MAX_LAUNCHES];
static int num_launches;

FAKE_API CUresult CUDAAPI cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
FAKE_API CUresult CUDAAPI cuDriverGetVersion(int *v) { *v = 12080; return CUDA_SUCCESS; }
FAKE_API CUresult CUDAAPI cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return ordinal == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }
FAKE_API CUresult CUDAAPI cuDeviceGetCount(int *n) { *n = 1; return CUDA_SUCCESS; }
FAKE_API CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice d) {
  (void)d;
  strncpy(name, "fake sm_90 (native/tests/fake_cuda.c)", (size_t)len);
  return CUDA_SUCCESS;
}
FAKE_API CUresult CUDAAPI cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
  (void)d;
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 227 * 1024; break;
    default: *v = 0;
  }
  return CUDA_SUCCESS;
}
static int the_context;
FAKE_API CUresult CUDAAPI cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)&the_context; return CUDA_SUCCESS; }
FAKE_API CUresult CUDAAPI cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
static int the_module;
FAKE_API CUresult CUDAAPI cuModuleLoadData(CUmodule *m, const void *image) {
  (void)image;
  *m = (CUmodule)&the_module;
  return CUDA_SUCCESS;
}
FAKE_API CUresult CUDAAPI cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  (void)m;
  if (num_funcs == FAKE_MAX_FUNCS) return CUDA_ERROR_OUT_OF_MEMORY;
  strncpy(func_names[num_funcs], name, sizeof func_names[0] - 1);
  *f = (CUfunction)(uintptr_t)(num_funcs + 1); /* a handle that is its index + 1, never NULL */
  num_funcs++;
  return CUDA_SUCCESS;
}
FAKE_API CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { (void)f, (void)c; return CUDA_SUCCESS; }
FAKE_API CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  (void)f, (void)a, (void)v;
  return CUDA_SUCCESS;
}

/* The pointer arguments that lead each kernel's signature (the rest are ints, whose count depends on the
   specialisation's folding): the GEMM's x, w, b, y, ws (+ arrivals in the fused form), the reduce's ws, b, y. */
static int leading_pointers(const char *name) {
  if (strstr(name, "_linear_splitk_fused_kernel")) return 6;
  if (strstr(name, "_linear_kernel")) return 5;
  if (strstr(name, "_splitk_reduce_kernel")) return 3;
  return 0;
}

FAKE_API CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                         unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
  (void)by, (void)bz, (void)s, (void)extra;
  uintptr_t index = (uintptr_t)f;
  if (index < 1 || index > (uintptr_t)num_funcs || num_launches == FAKE_MAX_LAUNCHES) return CUDA_ERROR_INVALID_HANDLE;
  fake_launch_record *r = &launches[num_launches++];
  memset(r, 0, sizeof *r);
  strncpy(r->name, func_names[index - 1], sizeof r->name - 1);
  r->grid[0] = gx, r->grid[1] = gy, r->grid[2] = gz;
  r->block = bx, r->shared = shared;
  r->num_ptrs = leading_pointers(r->name);
  for (int i = 0; i < r->num_ptrs; i++) r->ptrs[i] = (unsigned long long)*(CUdeviceptr *)params[i];
  return CUDA_SUCCESS;
}

/* -- what the test reads ------------------------------------------------------------------------ */
FAKE_API int fake_cuda_num_launches(void) { return num_launches; }
FAKE_API void fake_cuda_reset(void) { num_launches = 0; }
/* Launch i: its kernel name (into name, len bytes), grid, and leading pointers (returns their count), or -1. */
FAKE_API int fake_cuda_launch(int i, char *name, int len, unsigned *grid, unsigned long long *ptrs) {
  if (i < 0 || i >= num_launches) return -1;
  const fake_launch_record *r = &launches[i];
  strncpy(name, r->name, (size_t)len);
  memcpy(grid, r->grid, sizeof r->grid);
  memcpy(ptrs, r->ptrs, sizeof r->ptrs);
  return r->num_ptrs;
}
