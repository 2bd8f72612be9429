"""The oldest Triton the kernels run on, checked when the first kernel module is imported.

A leaf with no imports, so the floor can be read (by the tests, by pyproject's consistency check) without
importing Triton. ``autotune`` calls ``triton_too_old`` right after ``import triton`` and raises ImportError,
which the triton backend turns into its one-line "not available" reason; without the check an old Triton
would fail later and less clearly (``tl.gather`` missing at the first LRN launch, an unexpected keyword at
the ``@triton.autotune`` decorator).

Only Triton 3.8.0 has actually been run (interpreter, and the sm_80/sm_90 compile check); the floor is the
release that introduced the newest public API the kernels use.
"""

from __future__ import annotations

# (major, minor) and why: each entry is an API the kernels use and the release that introduced it.
MIN_TRITON = (3, 4)
MIN_TRITON_REASONS = (
    "tl.gather (the LRN window sums in lrn.py and the fused pool+LRN kernel): first released in 3.3",
    "@triton.autotune(cache_results=True) (tuned configs kept on disk across runs and workers): 3.4",
)


def _release(version: str) -> tuple[int, ...]:
    """(3, 8, 0) from "3.8.0", "3.8.0+git1234" or "3.4.0rc1"; () when the version cannot be read."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def triton_too_old(version: str) -> str | None:
    """Why Triton ``version`` cannot run the kernels (one line), or None when it can."""
    release = _release(version)
    if len(release) >= 2 and release[:2] >= MIN_TRITON:
        return None
    floor = ".".join(map(str, MIN_TRITON))
    return f"triton {version} is older than {floor}, the oldest the fastfeat kernels run on (they use " + (
        "; ".join(MIN_TRITON_REASONS) + ")"
    )
