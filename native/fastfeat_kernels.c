/* The public API of libfastfeat_kernels (fastfeat_kernels.h): argument checks, the launch arithmetic of
   fastfeat.kernels' Python launchers (conv.py, gemm.py, pool.py, lrn.py) in C, the lookup of the AOT
   specialisation, and the launch through the generated dispatchers.

   The arithmetic mirrors the launchers line by line (their constants come from ff_constants.h, read
   from the Python modules at build time); tests/test_plans.py checks every plan against the launches
   the Python launchers make for the shipped networks. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_shim.h"
#include "fastfeat_kernels.h"
#include "ff_aot_runtime.h"
#include "ff_internal.h"

/* -- errors ------------------------------------------------------------------------------------- */
static __thread CUresult last_load_error = CUDA_ERROR_NOT_INITIALIZED;
static __thread int last_cuda_error = 0;

void ff_aot_note_error(CUresult result) { last_load_error = result; }
CUresult ff_aot_load_error(void) { return last_load_error; }

const char *fastfeat_status_string(int status) {
  switch (status) {
    case FASTFEAT_OK: return "ok";
    case FASTFEAT_ERR_INVALID_ARGUMENT:
      return "invalid argument: a NULL or misaligned pointer, a non-positive size, or inconsistent shapes";
    case FASTFEAT_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype: use FASTFEAT_FP32, FASTFEAT_FP16 or FASTFEAT_BF16";
    case FASTFEAT_ERR_UNSUPPORTED_SHAPE:
      return "unsupported shape: no kernel specialisation for it was compiled into this library (it holds the "
             "shipped networks' layers); the Python triton backend JIT-compiles such shapes";
    case FASTFEAT_ERR_NO_DRIVER: return "no CUDA driver: libcuda.so.1 could not be loaded (this machine has no NVIDIA driver)";
    case FASTFEAT_ERR_NO_DEVICE: return "no CUDA device: the driver loaded but found no usable GPU";
    case FASTFEAT_ERR_NO_CONTEXT: return "no current CUDA context on this thread (create or make one current first)";
    case FASTFEAT_ERR_WRONG_ARCH:
      return "wrong GPU architecture: the library holds kernels for sm_80 (A100) and sm_90 (H100/H200) only";
    case FASTFEAT_ERR_LAUNCH: return "kernel launch failed: the CUDA driver rejected a module load or a launch";
    case FASTFEAT_ERR_WORKSPACE: return "split-K workspace missing or too small (see fastfeat_gemm_workspace_bytes)";
    case FASTFEAT_ERR_OTHER_CONTEXT:
      return "another CUDA context: the kernels were loaded into a different context (one per process)";
    default: return "unknown fastfeat status code";
  }
}

const char *fastfeat_build_info(void) { return ff_build_info; }
const char *fastfeat_kernel_hash(void) { return ff_kernel_hash; }
int fastfeat_abi_version(void) { return FASTFEAT_KERNELS_ABI_VERSION; }
int fastfeat_num_entries(void) { return ff_num_entries; }
int fastfeat_last_cuda_error(void) { return last_cuda_error; }

const char *fastfeat_driver_error(void) { return ff_cuda_driver_error(); }

/* -- device ------------------------------------------------------------------------------------- */
#define FF_MAX_DEVICES 64
static struct { int arch, sm_count; } device_cache[FF_MAX_DEVICES];
static CUcontext loaded_context;
static pthread_mutex_t device_lock = PTHREAD_MUTEX_INITIALIZER;

static int target_of_arch(int arch) {
  for (int t = 0; t < FF_NUM_TARGETS; t++)
    if (ff_target_arch[t] == arch) return t;
  return -1;
}

/* The current context's target index and SM count, or an error status. */
static int current_device(int *target, int *sm_count, int *arch_out) {
  CUresult r = ff_cuda_load();
  if (r == CUDA_ERROR_SHARED_OBJECT_INIT_FAILED) return FASTFEAT_ERR_NO_DRIVER;
  if (r != CUDA_SUCCESS) return FASTFEAT_ERR_NO_DEVICE;
  CUcontext ctx = NULL;
  if (cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || ctx == NULL) return FASTFEAT_ERR_NO_CONTEXT;
  CUdevice dev;
  if (cuCtxGetDevice(&dev) != CUDA_SUCCESS || dev < 0 || dev >= FF_MAX_DEVICES) return FASTFEAT_ERR_NO_CONTEXT;
  int status = FASTFEAT_OK;
  pthread_mutex_lock(&device_lock);
  if (loaded_context == NULL) loaded_context = ctx; /* the generated launchers load modules into it */
  if (ctx != loaded_context) status = FASTFEAT_ERR_OTHER_CONTEXT;
  if (status == FASTFEAT_OK && device_cache[dev].arch == 0) {
    int major = 0, minor = 0, sms = 0;
    if (cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev) != CUDA_SUCCESS ||
        cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev) != CUDA_SUCCESS ||
        cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) != CUDA_SUCCESS)
      status = FASTFEAT_ERR_NO_DEVICE;
    else {
      device_cache[dev].arch = major * 10 + minor;
      device_cache[dev].sm_count = sms;
    }
  }
  int arch = device_cache[dev].arch, sms = device_cache[dev].sm_count;
  pthread_mutex_unlock(&device_lock);
  if (status != FASTFEAT_OK) return status;
  if (arch_out) *arch_out = arch;
  *sm_count = sms;
  /* Exact: an sm_90a cubin runs on 9.0 only, and the sm_80 configs were pruned with A100's shared memory. */
  *target = target_of_arch(arch);
  return *target < 0 ? FASTFEAT_ERR_WRONG_ARCH : FASTFEAT_OK;
}

int fastfeat_check_device(int *arch, int *sm_count) {
  int target, sms, a = 0;
  int status = current_device(&target, &sms, &a);
  if (arch) *arch = a;
  if (sm_count && status == FASTFEAT_OK) *sm_count = sms;
  return status;
}

/* -- lookup ------------------------------------------------------------------------------------- */
static int lookup(int family, int dtype, int target, const int *key, int nkey) {
  for (int i = 0; i < ff_num_entries; i++) {
    const ff_entry *e = &ff_entries[i];
    if (e->family != family || e->dtype != dtype || e->target != target) continue;
    int same = 1;
    for (int j = 0; j < nkey && same; j++) same = e->key[j] == key[j];
    if (same) return i;
  }
  return -1;
}

/* -- the launchers' arithmetic ------------------------------------------------------------------ */
static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}
static int m_bucket(int64_t m) {
  int64_t p = next_pow2(m < 1 ? 1 : m);
  return (int)(p < FF_M_BUCKET_CAP ? p : FF_M_BUCKET_CAP);
}
static int batch_bucket(int64_t n) {
  int64_t p = next_pow2(n < 1 ? 1 : n);
  return (int)(p < FF_BATCH_BUCKET_CAP ? p : FF_BATCH_BUCKET_CAP);
}
static int valid_dtype(int dtype) { return dtype >= 0 && dtype < FF_NUM_DTYPES; }

/* kernels/sizes.py */
static int64_t conv_out(int64_t size, int k, int s, int p) { return (size + 2 * p - k) / s + 1; }
static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
static int64_t pool_out(int64_t size, int k, int s, int p, int ceil_mode) {
  int64_t span = size + 2 * p - k;
  int64_t out = (ceil_mode ? -floor_div(-span, s) : floor_div(span, s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) out -= 1;
  return out;
}

static void plan_init(fastfeat_plan *plan) {
  plan->num_launches = 0;
  plan->entry[0] = plan->entry[1] = -1;
  plan->split_k = 1;
  plan->workspace_bytes = 0;
  plan->counter_bytes = 0;
}

/* conv.py: conv2d_nhwc */
typedef struct {
  int oh, ow, cin_g, cout_g;
  int64_t m_gemm;
} conv_sizes;

static int conv_check(const fastfeat_conv_desc *d, conv_sizes *s) {
  if (!d) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->n < 0 || d->h < 1 || d->w < 1 || d->c_in < 1 || d->c_out < 1 || d->groups < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->kernel_h < 1 || d->kernel_w < 1 || d->stride_h < 1 || d->stride_w < 1 || d->pad_h < 0 || d->pad_w < 0)
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->c_in % d->groups || d->c_out % d->groups) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int64_t oh = conv_out(d->h, d->kernel_h, d->stride_h, d->pad_h), ow = conv_out(d->w, d->kernel_w, d->stride_w, d->pad_w);
  if (oh < 1 || ow < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int64_t m = (int64_t)d->n * oh * ow;
  if (m > FF_MAX_GEMM_M) return FASTFEAT_ERR_UNSUPPORTED_SHAPE; /* the kernel keeps N*OH*OW in int32 */
  s->oh = (int)oh;
  s->ow = (int)ow;
  s->cin_g = d->c_in / d->groups;
  s->cout_g = d->c_out / d->groups;
  s->m_gemm = m;
  return FASTFEAT_OK;
}

int fastfeat_conv2d_output_size(const fastfeat_conv_desc *d, int *oh, int *ow) {
  conv_sizes s;
  int status = conv_check(d, &s);
  if (status == FASTFEAT_OK) {
    if (oh) *oh = s.oh;
    if (ow) *ow = s.ow;
  }
  return status;
}

static int conv_plan(int target, int dtype, const fastfeat_conv_desc *d, conv_sizes *s, fastfeat_plan *plan) {
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  int status = conv_check(d, s);
  if (status != FASTFEAT_OK) return status;
  plan_init(plan);
  if (s->m_gemm == 0) return FASTFEAT_OK;
  int key[] = {s->cin_g, d->kernel_h, d->kernel_w, d->stride_h, d->stride_w, d->pad_h, d->pad_w,
               s->cin_g >= FF_TAP_LOOP_MIN_CIN, !!d->has_bias, !!d->relu, dtype == FASTFEAT_FP32 && !d->allow_tf32};
  int e = lookup(FF_CONV, dtype, target, key, (int)(sizeof key / sizeof key[0]));
  if (e < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  plan->num_launches = 1;
  plan->entry[0] = e;
  return FASTFEAT_OK;
}

/* gemm.py: linear, _pick_split_k and the fused reduce's arrival counters */
typedef struct {
  int splits, k_per_split;
} gemm_sizes;

static int gemm_check(const fastfeat_gemm_desc *d) {
  if (!d) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->m < 0 || d->n < 0 || d->k < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->w_row_stride < d->n || d->w_readable_cols < d->n || d->w_readable_cols > d->w_row_stride)
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->split_k_reduce != FASTFEAT_SPLITK_SEPARATE && d->split_k_reduce != FASTFEAT_SPLITK_FUSED)
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  return FASTFEAT_OK;
}

/* The split-K choice (gemm.py _pick_split_k and the chunk rounding of plan_linear). */
static void gemm_split(int sm_count, const fastfeat_gemm_desc *d, gemm_sizes *g) {
  int64_t bm = d->m <= 32 ? 16 : 128;
  int64_t tiles = cdiv(d->m, bm) * cdiv(d->n, FF_NOMINAL_BLOCK_N);
  int64_t want = (int64_t)FF_TARGET_PROGRAMS_PER_SM * sm_count;
  int64_t splits = 1;
  if (tiles > 0 && tiles < want) { /* tiles == 0: an empty output, nothing to split */
    splits = cdiv(want, tiles);
    if (splits > d->k / FF_SPLIT_K_MIN_CHUNK) splits = d->k / FF_SPLIT_K_MIN_CHUNK;
    if (splits > FF_MAX_SPLIT_K) splits = FF_MAX_SPLIT_K;
    if (splits < 1) splits = 1;
  }
  int64_t k_per_split = cdiv(cdiv(d->k, splits), FF_SPLIT_K_GRANULE) * FF_SPLIT_K_GRANULE;
  splits = cdiv(d->k, k_per_split); /* rounding the chunk up may leave fewer, never empty, splits */
  g->splits = (int)splits;
  g->k_per_split = (int)k_per_split;
}

/* The workspace of a split-K GEMM: the fp32 partials, then (fused reduce) the int32 arrival counters at a
   16-byte aligned offset (the kernel was compiled for a 16-byte aligned counter pointer). One counter per
   tile of the smallest tile (FF_ARRIVAL_TILE square; native/generate.py checks that no entry's tile is
   smaller), so the size does not depend on the dtype's config. */
static void gemm_workspace(const fastfeat_gemm_desc *d, int splits, size_t *workspace, size_t *counters) {
  *workspace = *counters = 0;
  if (splits <= 1 || d->m == 0 || d->n == 0) return;
  size_t partials = (size_t)splits * (size_t)d->m * (size_t)d->n * sizeof(float);
  if (d->split_k_reduce != FASTFEAT_SPLITK_FUSED) {
    *workspace = partials;
    return;
  }
  *counters = (size_t)cdiv(d->m, FF_ARRIVAL_TILE) * (size_t)cdiv(d->n, FF_ARRIVAL_TILE) * sizeof(int32_t);
  *workspace = (partials + 15) / 16 * 16 + *counters;
}

static int gemm_plan(int target, int sm_count, int dtype, const fastfeat_gemm_desc *d, gemm_sizes *g,
                     fastfeat_plan *plan) {
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  int status = gemm_check(d);
  if (status != FASTFEAT_OK) return status;
  if (sm_count < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  plan_init(plan);
  if (d->m == 0 || d->n == 0) return FASTFEAT_OK;
  gemm_split(sm_count, d, g);
  int splits = g->splits;
  int ieee = dtype == FASTFEAT_FP32 && !d->allow_tf32;
  int small_m = m_bucket(d->m) <= 32;
  int unaligned_loads = d->w_row_stride % FF_ALIGN_ELEMS != 0 || d->w_readable_cols % FF_ALIGN_ELEMS != 0;
  int unaligned_n = d->n % FF_ALIGN_ELEMS != 0;
  plan->split_k = splits;
  gemm_workspace(d, splits, &plan->workspace_bytes, &plan->counter_bytes);
  if (splits > 1 && d->split_k_reduce == FASTFEAT_SPLITK_FUSED) {
    /* One launch; its code depends on the exact split count (the arrival test and the unrolled sum). */
    int fkey[] = {small_m, unaligned_loads, unaligned_n, splits, !!d->has_bias, !!d->relu, ieee};
    int f = lookup(FF_LINEAR_FUSED, dtype, target, fkey, (int)(sizeof fkey / sizeof fkey[0]));
    if (f < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
    plan->entry[0] = f;
    plan->num_launches = 1;
    return FASTFEAT_OK;
  }
  int key[] = {small_m, unaligned_loads, unaligned_n, splits > 1, !!d->has_bias, !!d->relu, ieee};
  int e = lookup(FF_LINEAR, dtype, target, key, (int)(sizeof key / sizeof key[0]));
  if (e < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  plan->entry[0] = e;
  plan->num_launches = 1;
  if (splits > 1) {
    int rkey[] = {splits, !!d->has_bias, !!d->relu};
    int r = lookup(FF_REDUCE, dtype, target, rkey, 3);
    if (r < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
    plan->entry[1] = r;
    plan->num_launches = 2;
  }
  return FASTFEAT_OK;
}

/* pool.py: maxpool2d_nhwc; lrn.py: check_lrn_params, lrn_tile */
static int lrn_params_ok(const fastfeat_lrn_params *p, int channels) {
  if (p->size < 1 || p->size % 2 == 0 || !(p->k > 0) || p->alpha < 0 || p->beta < 0) return 0;
  return channels <= FF_MAX_LRN_CHANNELS;
}
static void lrn_tile(int channels, int *block_p, int *block_c) {
  int64_t bc = next_pow2(channels < 1 ? 1 : channels);
  int64_t bp = FF_LRN_TILE_ELEMS / bc;
  *block_p = (int)(bp < 1 ? 1 : bp);
  *block_c = (int)bc;
}

typedef struct {
  int oh, ow, block_p, block_c;
  int64_t p_total;
  float alpha_over_n, beta, k;
} pool_sizes;

static int pool_check(const fastfeat_pool_desc *d, pool_sizes *s) {
  if (!d) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->n < 0 || d->h < 1 || d->w < 1 || d->c < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->kernel_h < 1 || d->kernel_w < 1 || d->stride_h < 1 || d->stride_w < 1 || d->pad_h < 0 || d->pad_w < 0)
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (2 * d->pad_h > d->kernel_h || 2 * d->pad_w > d->kernel_w) return FASTFEAT_ERR_INVALID_ARGUMENT;
  if (d->fuse_lrn && !lrn_params_ok(&d->lrn, d->c)) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int64_t oh = pool_out(d->h, d->kernel_h, d->stride_h, d->pad_h, d->ceil_mode);
  int64_t ow = pool_out(d->w, d->kernel_w, d->stride_w, d->pad_w, d->ceil_mode);
  if (oh < 1 || ow < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  s->oh = (int)oh;
  s->ow = (int)ow;
  s->p_total = (int64_t)d->n * oh * ow;
  if (s->p_total > INT32_MAX) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  if (d->fuse_lrn)
    lrn_tile(d->c, &s->block_p, &s->block_c);
  else {
    s->block_p = FF_POOL_BLOCK_P;
    int64_t bc = next_pow2(d->c);
    s->block_c = (int)(bc < FF_POOL_BLOCK_C ? bc : FF_POOL_BLOCK_C);
  }
  /* The launcher passes LRNParams() (size 5, alpha 1e-4, beta 0.75, k 1) when no LRN is fused; the
     scalars are computed in double and narrowed to fp32, as Triton's launcher narrows Python floats. */
  fastfeat_lrn_params p = d->fuse_lrn ? d->lrn : (fastfeat_lrn_params){5, 1e-4, 0.75, 1.0};
  s->alpha_over_n = (float)(p.alpha / p.size);
  s->beta = (float)p.beta;
  s->k = (float)p.k;
  return FASTFEAT_OK;
}

int fastfeat_maxpool_output_size(const fastfeat_pool_desc *d, int *oh, int *ow) {
  pool_sizes s;
  int status = pool_check(d, &s);
  if (status == FASTFEAT_OK) {
    if (oh) *oh = s.oh;
    if (ow) *ow = s.ow;
  }
  return status;
}

static int pool_plan(int target, int dtype, const fastfeat_pool_desc *d, pool_sizes *s, fastfeat_plan *plan) {
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  int status = pool_check(d, s);
  if (status != FASTFEAT_OK) return status;
  plan_init(plan);
  if (s->p_total == 0) return FASTFEAT_OK;
  int key[] = {d->kernel_h, d->kernel_w, d->stride_h, d->stride_w, d->pad_h, d->pad_w, !!d->relu, !!d->fuse_lrn,
               d->fuse_lrn ? d->lrn.size : 5, s->block_p, s->block_c};
  int e = lookup(FF_POOL, dtype, target, key, (int)(sizeof key / sizeof key[0]));
  if (e < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  plan->num_launches = 1;
  plan->entry[0] = e;
  return FASTFEAT_OK;
}

typedef struct {
  int block_p, block_c;
  int64_t p_total;
} lrn_sizes;

static int lrn_plan(int target, int dtype, const fastfeat_lrn_desc *d, lrn_sizes *s, fastfeat_plan *plan) {
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  if (!d || d->n < 0 || d->h < 1 || d->w < 1 || d->c < 1 || !lrn_params_ok(&d->lrn, d->c))
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  s->p_total = (int64_t)d->n * d->h * d->w;
  if (s->p_total > INT32_MAX) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  lrn_tile(d->c, &s->block_p, &s->block_c);
  plan_init(plan);
  if (s->p_total == 0) return FASTFEAT_OK;
  int key[] = {d->lrn.size, s->block_p, s->block_c};
  int e = lookup(FF_LRN, dtype, target, key, 3);
  if (e < 0) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  plan->num_launches = 1;
  plan->entry[0] = e;
  return FASTFEAT_OK;
}

/* -- plans without a GPU ----------------------------------------------------------------------- */
static int plan_target(int arch, int sm_count, fastfeat_plan *plan, int *target) {
  if (!plan || sm_count < 1) return FASTFEAT_ERR_INVALID_ARGUMENT;
  *target = target_of_arch(arch);
  return *target < 0 ? FASTFEAT_ERR_WRONG_ARCH : FASTFEAT_OK;
}

int fastfeat_conv2d_plan(int arch, int sm_count, int dtype, const fastfeat_conv_desc *d, fastfeat_plan *plan) {
  int target, status = plan_target(arch, sm_count, plan, &target);
  conv_sizes s;
  return status != FASTFEAT_OK ? status : conv_plan(target, dtype, d, &s, plan);
}

int fastfeat_gemm_plan(int arch, int sm_count, int dtype, const fastfeat_gemm_desc *d, fastfeat_plan *plan) {
  int target, status = plan_target(arch, sm_count, plan, &target);
  gemm_sizes g;
  return status != FASTFEAT_OK ? status : gemm_plan(target, sm_count, dtype, d, &g, plan);
}

int fastfeat_maxpool_plan(int arch, int sm_count, int dtype, const fastfeat_pool_desc *d, fastfeat_plan *plan) {
  int target, status = plan_target(arch, sm_count, plan, &target);
  pool_sizes s;
  return status != FASTFEAT_OK ? status : pool_plan(target, dtype, d, &s, plan);
}

int fastfeat_lrn_plan(int arch, int sm_count, int dtype, const fastfeat_lrn_desc *d, fastfeat_plan *plan) {
  int target, status = plan_target(arch, sm_count, plan, &target);
  lrn_sizes s;
  return status != FASTFEAT_OK ? status : lrn_plan(target, dtype, d, &s, plan);
}

/* -- launches ----------------------------------------------------------------------------------- */
/* Every kernel specialisation assumes 16-byte aligned pointers, as torch's allocations are. */
static int aligned(const void *p) { return p != NULL && ((uintptr_t)p % 16) == 0; }

static int launched(CUresult r) {
  if (r == CUDA_SUCCESS) return FASTFEAT_OK;
  last_cuda_error = (int)r;
  /* The dispatchers answer CUDA_ERROR_INVALID_VALUE when no compiled variant fits the arguments'
     divisibility (triton.tools.link's TT_ERROR_INVALID_VALUE). */
  return r == CUDA_ERROR_INVALID_VALUE ? FASTFEAT_ERR_UNSUPPORTED_SHAPE : FASTFEAT_ERR_LAUNCH;
}

#define DEV(p) ((CUdeviceptr)(uintptr_t)(p))

int fastfeat_conv2d_bias_relu(void *stream, int dtype, const fastfeat_conv_desc *d, const void *x, const void *weight,
                              const void *bias, void *y) {
  int target, sms;
  fastfeat_plan plan;
  conv_sizes s;
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  if (!d || !aligned(x) || !aligned(weight) || !aligned(y) || (d->has_bias && !aligned(bias)) ||
      (!d->has_bias && bias != NULL))
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  int status = current_device(&target, &sms, NULL);
  if (status == FASTFEAT_OK) status = conv_plan(target, dtype, d, &s, &plan);
  if (status != FASTFEAT_OK || plan.num_launches == 0) return status;
  ff_conv_unit_fn fn = ff_conv_units[dtype][target];
  if (!fn) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  return launched(fn((CUstream)stream, DEV(x), DEV(weight), DEV(d->has_bias ? bias : x), DEV(y), d->h, d->w, d->c_in,
                     s.oh, s.ow, d->c_out, (int32_t)s.m_gemm, s.cout_g, m_bucket(s.m_gemm), batch_bucket(d->n),
                     ff_entries[plan.entry[0]].algo));
}

int fastfeat_gemm_workspace_bytes(const fastfeat_gemm_desc *d, size_t *bytes) {
  int target, sms;
  size_t counters;
  gemm_sizes g;
  if (!bytes) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int status = gemm_check(d);
  if (status == FASTFEAT_OK) status = current_device(&target, &sms, NULL);
  if (status != FASTFEAT_OK) return status;
  gemm_split(sms, d, &g);
  gemm_workspace(d, g.splits, bytes, &counters);
  return FASTFEAT_OK;
}

int fastfeat_gemm_bias_relu(void *stream, int dtype, const fastfeat_gemm_desc *d, const void *x, const void *weight,
                            const void *bias, void *y, void *workspace, size_t workspace_bytes) {
  int target, sms;
  fastfeat_plan plan;
  gemm_sizes g;
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  if (!d || !aligned(x) || !aligned(weight) || !aligned(y) || (d->has_bias && !aligned(bias)) ||
      (!d->has_bias && bias != NULL) || (workspace != NULL && !aligned(workspace)))
    return FASTFEAT_ERR_INVALID_ARGUMENT;
  int status = gemm_check(d);
  if (status == FASTFEAT_OK) status = current_device(&target, &sms, NULL);
  if (status == FASTFEAT_OK) status = gemm_plan(target, sms, dtype, d, &g, &plan);
  if (status != FASTFEAT_OK || plan.num_launches == 0) return status;
  if (plan.workspace_bytes && (workspace == NULL || workspace_bytes < plan.workspace_bytes))
    return FASTFEAT_ERR_WORKSPACE;
  CUdeviceptr b = DEV(d->has_bias ? bias : x); /* a dummy pointer when there is no bias: never read */
  int algo = ff_entries[plan.entry[0]].algo;
  if (plan.split_k > 1 && d->split_k_reduce == FASTFEAT_SPLITK_FUSED) {
    ff_linear_fused_unit_fn fused = ff_linear_fused_units[dtype][target];
    if (!fused) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
    CUdeviceptr arrivals = DEV(workspace) + (CUdeviceptr)(plan.workspace_bytes - plan.counter_bytes);
    return launched(fused((CUstream)stream, DEV(x), DEV(weight), b, DEV(y), DEV(workspace), arrivals, d->m, d->n,
                          d->k, d->w_row_stride, d->w_readable_cols, m_bucket(d->m), g.k_per_split, algo));
  }
  ff_linear_unit_fn fn = ff_linear_units[dtype][target];
  ff_reduce_unit_fn reduce = ff_reduce_units[dtype][target];
  if (!fn || (plan.num_launches == 2 && !reduce)) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  CUdeviceptr ws = plan.num_launches == 2 ? DEV(workspace) : DEV(y);
  status = launched(fn((CUstream)stream, DEV(x), DEV(weight), b, DEV(y), ws, d->m, d->n, d->k, d->w_row_stride,
                       d->w_readable_cols, m_bucket(d->m), g.k_per_split, algo));
  if (status != FASTFEAT_OK || plan.num_launches == 1) return status;
  return launched(reduce((CUstream)stream, ws, b, DEV(y), d->m, d->n, ff_entries[plan.entry[1]].algo));
}

int fastfeat_maxpool_relu_lrn(void *stream, int dtype, const fastfeat_pool_desc *d, const void *x, void *y) {
  int target, sms;
  fastfeat_plan plan;
  pool_sizes s;
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  if (!d || !aligned(x) || !aligned(y)) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int status = current_device(&target, &sms, NULL);
  if (status == FASTFEAT_OK) status = pool_plan(target, dtype, d, &s, &plan);
  if (status != FASTFEAT_OK || plan.num_launches == 0) return status;
  ff_pool_unit_fn fn = ff_pool_units[dtype][target];
  if (!fn) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  return launched(fn((CUstream)stream, DEV(x), DEV(y), d->h, d->w, d->c, s.oh, s.ow, (int32_t)s.p_total,
                     s.alpha_over_n, s.beta, s.k, ff_entries[plan.entry[0]].algo));
}

int fastfeat_lrn(void *stream, int dtype, const fastfeat_lrn_desc *d, const void *x, void *y) {
  int target, sms;
  fastfeat_plan plan;
  lrn_sizes s;
  if (!valid_dtype(dtype)) return FASTFEAT_ERR_UNSUPPORTED_DTYPE;
  if (!d || !aligned(x) || !aligned(y)) return FASTFEAT_ERR_INVALID_ARGUMENT;
  int status = current_device(&target, &sms, NULL);
  if (status == FASTFEAT_OK) status = lrn_plan(target, dtype, d, &s, &plan);
  if (status != FASTFEAT_OK || plan.num_launches == 0) return status;
  ff_lrn_unit_fn fn = ff_lrn_units[dtype][target];
  if (!fn) return FASTFEAT_ERR_UNSUPPORTED_SHAPE;
  return launched(fn((CUstream)stream, DEV(x), DEV(y), (int32_t)s.p_total, d->c, (float)(d->lrn.alpha / d->lrn.size),
                     (float)d->lrn.beta, (float)d->lrn.k, ff_entries[plan.entry[0]].algo));
}
