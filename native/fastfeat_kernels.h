/* libfastfeat_kernels: fastfeat's Triton kernels compiled ahead of time (sm_80 and sm_90), callable
   from C and C++ with no Python, no Triton and no JIT compilation.

   Every function takes device pointers (16-byte aligned, as torch and cuMemAlloc return them), the
   shapes in a small descriptor, a dtype and a CUstream passed as an opaque pointer (NULL: the legacy
   default stream), and launches on the CUDA context current on the calling thread. It returns a
   fastfeat_status; fastfeat_status_string() gives a readable message. Bad input returns an error
   status, never crashes; without a CUDA driver every launching function returns
   FASTFEAT_ERR_NO_DRIVER.

   The library holds exactly the kernel specialisations the triton backend launches for the shipped
   networks (CaffeNet, AlexNet, VGG-16; fp32/fp16/bf16), each with one tile config: the first one the
   autotuner's prune rules keep on that GPU (what FASTFEAT_AUTOTUNE=0 runs). Other shapes return
   FASTFEAT_ERR_UNSUPPORTED_SHAPE. Layouts are those of fastfeat.kernels: NHWC activations, weights
   packed by pack_conv_weight / pack_linear_weight, fp32 biases.

   Threading: the first launch of each kernel loads its module into the current context; the library
   serves one CUDA context per process (another returns FASTFEAT_ERR_OTHER_CONTEXT). */
#ifndef FASTFEAT_KERNELS_H
#define FASTFEAT_KERNELS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(FASTFEAT_BUILDING_LIBRARY)
#define FASTFEAT_API __attribute__((visibility("default")))
#else
#define FASTFEAT_API
#endif

/* 2: fastfeat_gemm_desc.split_k_reduce and fastfeat_plan.counter_bytes (the fused split-K reduce). */
#define FASTFEAT_KERNELS_ABI_VERSION 2

typedef enum fastfeat_status {
  FASTFEAT_OK = 0,
  FASTFEAT_ERR_INVALID_ARGUMENT = 1,  /* a NULL or misaligned pointer, a negative size, inconsistent shapes */
  FASTFEAT_ERR_UNSUPPORTED_DTYPE = 2, /* dtype is not one of fastfeat_dtype */
  FASTFEAT_ERR_UNSUPPORTED_SHAPE = 3, /* valid, but no kernel specialisation was built for it */
  FASTFEAT_ERR_NO_DRIVER = 4,         /* libcuda.so.1 cannot be loaded */
  FASTFEAT_ERR_NO_DEVICE = 5,         /* the driver loaded but cuInit found no usable GPU */
  FASTFEAT_ERR_NO_CONTEXT = 6,        /* no CUDA context is current on the calling thread */
  FASTFEAT_ERR_WRONG_ARCH = 7,        /* the current GPU is neither sm_80 (A100) nor sm_90 (H100/H200) */
  FASTFEAT_ERR_LAUNCH = 8,            /* the driver rejected a module load or a launch */
  FASTFEAT_ERR_WORKSPACE = 9,         /* the split-K workspace is missing or too small */
  FASTFEAT_ERR_OTHER_CONTEXT = 10,    /* modules are already loaded into another CUDA context */
} fastfeat_status;

typedef enum fastfeat_dtype { FASTFEAT_FP32 = 0, FASTFEAT_FP16 = 1, FASTFEAT_BF16 = 2 } fastfeat_dtype;

/* How a GEMM that splits K sums its fp32 partials (fastfeat_gemm_desc.split_k_reduce). Both sum them in
   split order 0, 1, ..., split_k - 1 and give bit-identical outputs.
   SEPARATE: the GEMM writes the partials to the workspace, a second launch sums them (2 launches).
   FUSED: one launch; the last program to finish an output tile sums that tile's partials. Its workspace
   holds, after the partials, one int32 arrival counter per output tile (the last
   fastfeat_plan.counter_bytes bytes of fastfeat_gemm_workspace_bytes), with this contract:
     * the counters must be zero when a fused launch starts. Every completed fused launch leaves them zero,
       so: zero the workspace (e.g. cuMemsetD8Async) once before its first fused use, then reuse it;
     * the launches that use one workspace must be ordered one after another (one stream at a time, or
       ordered by events): two launches in flight on the same counters corrupt each other's sums;
     * the layout follows the descriptor (m, n, k) and the GPU: a workspace whose bytes were used by a
       call with another descriptor, by the separate reduce, or by anything else, must be zeroed again
       before its next fused use; so must one whose fused launch did not complete (an error, a reset).
   Unused when the plan does not split K (fastfeat_plan.split_k == 1). */
typedef enum fastfeat_splitk_reduce { FASTFEAT_SPLITK_SEPARATE = 0, FASTFEAT_SPLITK_FUSED = 1 } fastfeat_splitk_reduce;

/* Caffe across-channel LRN: y = x / (k + alpha / size * sum of x^2 over size channels)^beta (odd size). */
typedef struct fastfeat_lrn_params {
  int size;
  double alpha, beta, k;
} fastfeat_lrn_params;

/* conv2d (+ bias) (+ ReLU): x [n, h, w, c_in] NHWC; weight [groups, c_out/groups, kh*kw*c_in/groups]
   (pack_conv_weight); bias [c_out] fp32 or NULL; y [n, oh, ow, c_out]. */
typedef struct fastfeat_conv_desc {
  int n, h, w, c_in, c_out, groups;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int relu, has_bias, allow_tf32; /* allow_tf32: fp32 inputs with TF32 products (default exact) */
} fastfeat_conv_desc;

/* max-pool (+ ReLU before it) (+ LRN after it): x [n, h, w, c] NHWC; y [n, oh, ow, c]. */
typedef struct fastfeat_pool_desc {
  int n, h, w, c;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int ceil_mode, relu, fuse_lrn;
  fastfeat_lrn_params lrn; /* read when fuse_lrn */
} fastfeat_pool_desc;

/* LRN alone: x, y [n, h, w, c] NHWC. */
typedef struct fastfeat_lrn_desc {
  int n, h, w, c;
  fastfeat_lrn_params lrn;
} fastfeat_lrn_desc;

/* y[m, n] = relu?(x[m, k] @ W^T + bias): weight = W^T [k, n] with row stride w_row_stride >= n and
   w_readable_cols columns readable per row (pack_linear_weight pads rows to 16: both are the padded width). */
typedef struct fastfeat_gemm_desc {
  int m, n, k;
  int w_row_stride, w_readable_cols;
  int relu, has_bias, allow_tf32;
  int split_k_reduce; /* fastfeat_splitk_reduce; 0 (a zeroed descriptor) is FASTFEAT_SPLITK_SEPARATE */
} fastfeat_gemm_desc;

/* What a call would launch on a GPU of compute capability `arch` (80 or 90) with `sm_count` SMs;
   filled by the *_plan functions, which need no GPU. */
typedef struct fastfeat_plan {
  int num_launches;       /* 0 (empty output), 1, or 2 (split-K GEMM + its separate reduction) */
  int entry[2];           /* index in the build's entries.json (-1: none) */
  int split_k;            /* GEMM: number of K splits (1: none) */
  size_t workspace_bytes; /* GEMM: the workspace the caller provides (0 without split-K): split_k * m * n fp32
                             partial sums, then for the fused reduce, at a 16-byte aligned offset, the counters */
  size_t counter_bytes;   /* GEMM, fused reduce: the int32 arrival counters, the last counter_bytes of
                             workspace_bytes (one per output tile of the smallest tile; 0 otherwise) */
} fastfeat_plan;

FASTFEAT_API const char *fastfeat_status_string(int status);
/* The build: targets, dtypes, networks and entry count, as one line. */
FASTFEAT_API const char *fastfeat_build_info(void);
FASTFEAT_API int fastfeat_num_entries(void);
/* FASTFEAT_KERNELS_ABI_VERSION of the library (callers that dlopen it compare it with their header's). */
FASTFEAT_API int fastfeat_abi_version(void);
/* The hash of the kernel sources the library was built from (fastfeat.kernels.native.kernel_hash()). */
FASTFEAT_API const char *fastfeat_kernel_hash(void);
/* Why the driver could not be used (after FASTFEAT_ERR_NO_DRIVER / _NO_DEVICE), else "". */
FASTFEAT_API const char *fastfeat_driver_error(void);
/* The CUDA error of this thread's last FASTFEAT_ERR_LAUNCH (a CUresult), 0 if none. */
FASTFEAT_API int fastfeat_last_cuda_error(void);
/* Loads the driver and checks the current context's GPU: FASTFEAT_OK when the kernels can launch. */
FASTFEAT_API int fastfeat_check_device(int *arch, int *sm_count);

FASTFEAT_API int fastfeat_conv2d_plan(int arch, int sm_count, int dtype, const fastfeat_conv_desc *d,
                                      fastfeat_plan *plan);
FASTFEAT_API int fastfeat_maxpool_plan(int arch, int sm_count, int dtype, const fastfeat_pool_desc *d,
                                       fastfeat_plan *plan);
FASTFEAT_API int fastfeat_lrn_plan(int arch, int sm_count, int dtype, const fastfeat_lrn_desc *d,
                                   fastfeat_plan *plan);
FASTFEAT_API int fastfeat_gemm_plan(int arch, int sm_count, int dtype, const fastfeat_gemm_desc *d,
                                    fastfeat_plan *plan);
/* Output sizes (torch/Caffe rounding); FASTFEAT_ERR_INVALID_ARGUMENT for an impossible geometry. */
FASTFEAT_API int fastfeat_conv2d_output_size(const fastfeat_conv_desc *d, int *oh, int *ow);
FASTFEAT_API int fastfeat_maxpool_output_size(const fastfeat_pool_desc *d, int *oh, int *ow);

/* Conv + bias + ReLU. */
FASTFEAT_API int fastfeat_conv2d_bias_relu(void *stream, int dtype, const fastfeat_conv_desc *d, const void *x,
                                           const void *weight, const void *bias, void *y);
/* (ReLU +) max-pool (+ LRN). */
FASTFEAT_API int fastfeat_maxpool_relu_lrn(void *stream, int dtype, const fastfeat_pool_desc *d, const void *x,
                                           void *y);
/* LRN. */
FASTFEAT_API int fastfeat_lrn(void *stream, int dtype, const fastfeat_lrn_desc *d, const void *x, void *y);
/* GEMM + bias + ReLU; `workspace` (fastfeat_gemm_workspace_bytes; for d->split_k_reduce ==
   FASTFEAT_SPLITK_FUSED see the contract at fastfeat_splitk_reduce: zeroed before its first use, one stream
   at a time) may be NULL when it needs none; one smaller than needed returns FASTFEAT_ERR_WORKSPACE. */
FASTFEAT_API int fastfeat_gemm_bias_relu(void *stream, int dtype, const fastfeat_gemm_desc *d, const void *x,
                                         const void *weight, const void *bias, void *y, void *workspace,
                                         size_t workspace_bytes);
/* The split-K workspace a GEMM needs on the current GPU (0 when none), for d->split_k_reduce (the fused
   reduce's includes its counters). Arithmetic only: the same for every dtype, and also answered for a
   shape the library holds no kernel for (launching it returns FASTFEAT_ERR_UNSUPPORTED_SHAPE). */
FASTFEAT_API int fastfeat_gemm_workspace_bytes(const fastfeat_gemm_desc *d, size_t *bytes);

#ifdef __cplusplus
}
#endif
#endif
