"""The Triton kernels that are compiled ahead of time: (module under fastfeat.kernels, global name).

A leaf with no imports: the AOT build (``aot.py``, which records and compiles them) and the runtime
(``native.py``, whose ``kernel_hash`` keys the library on their sources) both read it, so the runtime
does not import the build tool.
"""

KERNELS = (
    ("conv", "_conv2d_nhwc_kernel"),
    ("gemm", "_linear_kernel"),
    ("gemm", "_splitk_reduce_kernel"),
    ("gemm", "_linear_splitk_fused_kernel"),
    ("pool", "_maxpool_nhwc_kernel"),
    ("lrn", "_lrn_nhwc_kernel"),
)
