/* Shared by fastfeat_kernels.c and the generated ff_entries.c: the lookup table and the dispatchers'
   signatures (those triton.tools.link generates: the kernel's runtime arguments, then the algo id;
   a mismatch is a compile error in ff_entries.c). */
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <cuda.h>
#include "ff_constants.h"

/* Order = native/generate.py FAMILIES. */
enum ff_family { FF_CONV, FF_LINEAR, FF_REDUCE, FF_POOL, FF_LRN, FF_LINEAR_FUSED, FF_NUM_FAMILIES };
#define FF_NUM_DTYPES 3
#define FF_NUM_TARGETS 2
#define FF_NUM_TILE 7

typedef struct ff_entry {
  int family, dtype, target;
  int key[FF_MAX_KEY];  /* native/generate.py KEY_FIELDS[family], zero-padded */
  int algo;             /* index in the (family, dtype, target) dispatcher's algo table */
  int tile[FF_NUM_TILE]; /* BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_P, BLOCK_C, BLOCK (0: n/a) */
  int num_warps, num_stages;
} ff_entry;

extern const ff_entry ff_entries[];
extern const int ff_num_entries;

typedef CUresult (*ff_conv_unit_fn)(CUstream, CUdeviceptr x, CUdeviceptr w, CUdeviceptr b, CUdeviceptr y, int32_t H,
                                    int32_t W, int32_t C_IN, int32_t OH, int32_t OW, int32_t C_OUT, int32_t M_GEMM,
                                    int32_t COUT_G, int32_t M_BUCKET, int32_t BATCH_BUCKET, int algo_id);
typedef CUresult (*ff_linear_unit_fn)(CUstream, CUdeviceptr x, CUdeviceptr w, CUdeviceptr b, CUdeviceptr y,
                                      CUdeviceptr ws, int32_t M, int32_t N, int32_t K, int32_t STRIDE_WK,
                                      int32_t N_LOAD, int32_t M_BUCKET, int32_t K_PER_SPLIT, int algo_id);
typedef CUresult (*ff_reduce_unit_fn)(CUstream, CUdeviceptr ws, CUdeviceptr b, CUdeviceptr y, int32_t M, int32_t N,
                                      int algo_id);
/* _linear_splitk_fused_kernel: _linear_kernel's arguments plus the arrival counters after the workspace. */
typedef CUresult (*ff_linear_fused_unit_fn)(CUstream, CUdeviceptr x, CUdeviceptr w, CUdeviceptr b, CUdeviceptr y,
                                            CUdeviceptr ws, CUdeviceptr arrivals, int32_t M, int32_t N, int32_t K,
                                            int32_t STRIDE_WK, int32_t N_LOAD, int32_t M_BUCKET, int32_t K_PER_SPLIT,
                                            int algo_id);
typedef CUresult (*ff_pool_unit_fn)(CUstream, CUdeviceptr x, CUdeviceptr y, int32_t H, int32_t W, int32_t C,
                                    int32_t OH, int32_t OW, int32_t P_TOTAL, float alpha_over_n, float beta,
                                    float lrn_k, int algo_id);
typedef CUresult (*ff_lrn_unit_fn)(CUstream, CUdeviceptr x, CUdeviceptr y, int32_t P_TOTAL, int32_t C,
                                   float alpha_over_n, float beta, float k, int algo_id);

extern const ff_conv_unit_fn ff_conv_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const ff_linear_unit_fn ff_linear_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const ff_reduce_unit_fn ff_reduce_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const ff_pool_unit_fn ff_pool_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const ff_lrn_unit_fn ff_lrn_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const ff_linear_fused_unit_fn ff_linear_fused_units[FF_NUM_DTYPES][FF_NUM_TARGETS];
extern const char ff_build_info[];
extern const char ff_kernel_hash[]; /* fastfeat.kernels.native.kernel_hash() of the sources built */
