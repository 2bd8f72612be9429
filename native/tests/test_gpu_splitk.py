"""ctest native_gpu_splitk_reduces_match (GPU only; exit 77 = skipped without one): the library's two split-K
reduces (fastfeat_gemm_desc.split_k_reduce) on every fc layer of the shipped networks, at batch sizes where
K splits, in fp32, fp16 and bf16:

* the fused reduce's output is bit-identical to the separate reduce's (same partials, summed in the same
  order), and both agree with a plain PyTorch reference (fp64) within the kernel tests' tolerances;
* the fused workspace's arrival counters are zero again after every launch, so a second launch on the
  same workspace gives the same bits (the header's "zeroed once" contract);
* a workspace one byte short of ``fastfeat_gemm_workspace_bytes`` is refused (FASTFEAT_ERR_WORKSPACE), for
  both forms, as is the separate form's smaller workspace for the fused form;
* through the Python launcher, ``FASTFEAT_NATIVE_SPLITK_REDUCE=fused`` makes ``kernels.linear`` launch the
  library's fused form, bit-identical to the JIT kernel.

Outputs are poisoned (NaN) before every launch.
"""

from __future__ import annotations

import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import EXIT_SKIP, open_on_gpu  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTFEAT_AUTOTUNE"] = "0"  # the JIT side runs the build's config
# Batch sizes: one row, a few, past the thin-tile family, and the benchmark's largest (fc6 still splits).
BATCHES = (1, 5, 33, 256)
PRECISIONS = ("bf16", "fp16", "fp32")
# ||out - ref|| / ||ref|| against fp64 (tests/kernels/test_gemm.py TOLERANCES).
TOLERANCES = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 6e-3}
ERR_WORKSPACE = 9


def main() -> int:
    import torch

    from fastfeat.kernels import gemm, native
    from fastfeat.models import get_model, list_models
    from fastfeat.runtime import PRECISIONS as DTYPES

    arch, sms = ctypes.c_int(0), ctypes.c_int(0)
    opened = open_on_gpu(arch, sms)
    if opened is None:
        return EXIT_SKIP
    dev, lib = opened
    stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
    codes = {"float32": 0, "float16": 1, "bfloat16": 2}
    failures: list[str] = []
    checked = 0
    gen = torch.Generator(device=dev).manual_seed(0)

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr()) if t is not None else None

    def launch(d, code, x, w, b, y, ws, nbytes):
        y.fill_(float("nan"))
        return lib.fastfeat_gemm_bias_relu(stream, code, d, ptr(x), ptr(w), ptr(b), ptr(y), ptr(ws), nbytes)

    shapes = set()
    for model in list_models():
        spec = get_model(model)
        inputs = spec.input_shapes()
        fcs = [layer for layer in spec.layers if layer.kind == "fc"]
        for i, layer in enumerate(fcs):
            k = 1
            for dim in inputs[layer.name]:
                k *= dim
            # ReLU is fused into every fc but the last in the forward plan; the every-layer plan fuses none.
            for relu in (False, True) if i + 1 < len(fcs) else (False,):
                shapes.add((layer.out, k, relu))
    for n, k, relu in sorted(shapes):
        for precision in PRECISIONS:
            dtype = DTYPES[precision]
            code = codes[str(dtype).replace("torch.", "")]
            weight = torch.randn(n, k, generator=gen, device=dev) * (2.0 / k) ** 0.5
            w = gemm.pack_linear_weight(weight, dtype=dtype)
            readable = gemm._readable_columns(w)
            b = torch.randn(n, generator=gen, device=dev) * 0.01
            for m in BATCHES:
                where = f"N={n} K={k} relu={int(relu)} {precision} b{m}"
                x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
                descs, sizes = {}, {}
                for form, reduce in native.SPLIT_K_REDUCE_CODES.items():
                    descs[form] = native.GemmDesc(m, n, k, w.stride(0), readable, int(relu), 1, 0, reduce)
                    need = ctypes.c_size_t(0)
                    status = lib.fastfeat_gemm_workspace_bytes(descs[form], ctypes.byref(need))
                    if status != native.OK:
                        failures.append(f"{where} {form}: workspace query: {native.status_string(lib, status)}")
                    sizes[form] = need.value
                plan = native.Plan()
                status = lib.fastfeat_gemm_plan(arch.value, sms.value, code, descs["fused"], ctypes.byref(plan))
                if status != native.OK:
                    failures.append(f"{where}: fused plan: {native.status_string(lib, status)}")
                    continue
                if plan.split_k < 2:
                    continue  # no split: both forms are the same single launch
                if plan.num_launches != 1 or plan.workspace_bytes != sizes["fused"]:
                    failures.append(f"{where}: fused plan {plan.num_launches} launches, {plan.workspace_bytes} B")
                ws_sep = torch.empty(sizes["separate"], dtype=torch.uint8, device=dev)
                ws_fused = torch.zeros(sizes["fused"], dtype=torch.uint8, device=dev)
                y_sep = torch.empty(m, n, dtype=dtype, device=dev)
                y_fused = torch.empty_like(y_sep)
                y_again = torch.empty_like(y_sep)
                statuses = (
                    launch(descs["separate"], code, x, w, b, y_sep, ws_sep, sizes["separate"]),
                    launch(descs["fused"], code, x, w, b, y_fused, ws_fused, sizes["fused"]),
                    launch(descs["fused"], code, x, w, b, y_again, ws_fused, sizes["fused"]),
                )
                torch.cuda.synchronize()
                if any(s != native.OK for s in statuses):
                    failures.append(f"{where}: launch statuses {statuses}")
                    continue
                counters = ws_fused[sizes["fused"] - plan.counter_bytes :]
                if counters.any():
                    failures.append(f"{where}: arrival counters not zero after the fused launches")
                if not torch.equal(y_sep, y_fused):
                    diff = (y_sep.float() - y_fused.float()).abs().max().item()
                    failures.append(f"{where}: fused differs from separate (max abs diff {diff:.3g})")
                if not torch.equal(y_fused, y_again):
                    failures.append(f"{where}: a second fused launch on the same workspace differs")
                ref = x.double() @ w.double() + b.double()
                if relu:
                    ref = ref.clamp_min(0)
                for form, y in (("separate", y_sep), ("fused", y_fused)):
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    if not err <= TOLERANCES[precision]:  # NaN fails too
                        failures.append(f"{where} {form}: relative error {err:.2e} > {TOLERANCES[precision]}")
                short = (
                    ("separate one byte short", descs["separate"], ws_sep, sizes["separate"] - 1),
                    ("fused one byte short", descs["fused"], ws_fused, sizes["fused"] - 1),
                    ("fused with the separate size", descs["fused"], ws_fused, sizes["separate"]),
                )
                for what, d, ws, nbytes in short:
                    status = launch(d, code, x, w, b, y_again, ws, nbytes)
                    if status != ERR_WORKSPACE:
                        failures.append(f"{where}: {what}: status {status}, expected {ERR_WORKSPACE}")
                checked += 1

    # The Python launcher: the env switch picks the fused form; it matches the JIT kernel bit for bit.
    n, k = 4096, 9216
    weight = torch.randn(n, k, generator=gen, device=dev) * (2.0 / k) ** 0.5
    w = gemm.pack_linear_weight(weight, dtype=torch.bfloat16)
    b = torch.randn(n, generator=gen, device=dev) * 0.01
    x = torch.randn(1, k, generator=gen, device=dev).to(torch.bfloat16)
    outs = {}
    for label, enable, form in (
        ("jit", "0", "separate"),
        ("aot fused", "1", "fused"),
        ("aot separate", "1", "separate"),
    ):
        os.environ[native.ENV_ENABLE] = enable
        os.environ[native.ENV_SPLIT_K_REDUCE] = form
        native.reset()
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=dev)
        gemm.linear(x, w, b, relu=True, out=out)
        torch.cuda.synchronize()
        outs[label] = out
        launched = native.stats()["aot_launches"]
        if (enable == "1") != (launched > 0):
            failures.append(f"python linear {label}: {launched} library launches ({native.describe()})")
    for label in ("aot fused", "aot separate"):
        if not torch.equal(outs["jit"], outs[label]):
            failures.append(f"python linear {label}: differs from the JIT kernel")
    os.environ.pop(native.ENV_SPLIT_K_REDUCE, None)

    for f in failures[:60]:
        print("FAIL", f)
    print(f"{checked} split-K GEMMs compared (separate vs fused vs torch), {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
