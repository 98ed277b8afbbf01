"""Pinned CPU kernels: the quick profile gives the same bits on any x86-64 machine.

The same torch wheel computes with different instructions on different CPUs: ATen dispatches its
vectorised kernels to the widest instruction set the CPU has (AVX-512 on most Intel servers, AVX2
here), oneDNN's convolutions do the same, MKL's matrix products pick a code path by CPU and vendor,
and numpy and OpenBLAS dispatch too. The paths agree to rounding, not to the bit, and training
amplifies the last bit into different weights, accuracies and, near a margin, verdicts.

:func:`pin_cpu_kernels` fixes every one of those dispatchers to a path that every x86-64 CPU the
book supports has (SSE4.1, the x86-64-v2 level that numpy 2 needs anyway):

=========================  ==========================  ===============================================
variable                   value                       what it fixes
=========================  ==========================  ===============================================
``ATEN_CPU_CAPABILITY``    ``default``                 ATen's own kernels: the compiler's baseline
                                                       build instead of the AVX2 / AVX-512 variants
``ONEDNN_MAX_CPU_ISA``     ``SSE41``                   oneDNN (convolutions, some matmuls)
``MKL_CBWR``               ``COMPATIBLE``              MKL's conditional numerical reproducibility:
                                                       one code path on every CPU and vendor
``NPY_DISABLE_CPU_FEATURES`` the dispatch targets      numpy's SIMD loops above its x86-64-v2 baseline
                           above x86-64-v2
``OPENBLAS_CORETYPE``      ``Prescott``                the OpenBLAS kernels numpy and scipy call
``*_NUM_THREADS``          ``1``                       the order of parallel reductions
=========================  ==========================  ===============================================

Every variable is read when its library first initialises, so the pin must run before torch or
numpy is imported: each chapter's setup cell calls it first, ``make``'s runners (papermill, nbval)
put the same variables into the kernel's environment, and :func:`require_pinned_kernels` (called by
:func:`shared.book.start_chapter` in the quick profile) refuses to run a quick profile whose torch
was imported unpinned. What it costs in time is measured in the README. This module imports
neither torch nor numpy.

What the pin cannot do: make an ARM machine compute like an x86-64 one (a different compiler's
baseline), or remove a change of torch, numpy or MKL version (the lock file fixes those).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

PIN_VERSION = 1
"""Bumped whenever :data:`PINNED_ENV` changes (it is part of every cache key, see :func:`kernel_signature`)."""

THREAD_VARIABLES: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "DNNL_MAX_CPU_ISA": "SSE41",  # the same knob under oneDNN's older name
    "MKL_CBWR": "COMPATIBLE",
    # numpy 2 names its dispatch targets by x86-64 level; numpy 1's names are listed too (unknown names are ignored)
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR AVX2 FMA3 AVX512F AVX512_SKX",
    "OPENBLAS_CORETYPE": "Prescott",
    **{var: "1" for var in THREAD_VARIABLES},
}
"""The environment of the pinned kernels (see the module's table)."""

EMULATED_CPUS: dict[str, dict[str, str]] = {
    "avx": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "AVX",
        "DNNL_MAX_CPU_ISA": "AVX",
        "MKL_ENABLE_INSTRUCTIONS": "AVX",
        "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
        "OPENBLAS_CORETYPE": "Sandybridge",
    },
    "sse4": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "DNNL_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
        "OPENBLAS_CORETYPE": "Nehalem",
    },
}
"""Other CPUs as this one can pretend to be them: each library's dispatcher capped below the host's
instruction set (a CPU can only be made to look older, never newer). ``tests/test_portability.py``
runs chapters under these and requires the same results files."""


def is_x86_64() -> bool:
    """Whether this is an x86-64 machine (the pin's instruction levels are x86-64 levels)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`PINNED_ENV` in ``environ`` (default: this process's environment), overriding any value.

    Call it before torch or numpy is imported. Returns the variables set.

    Raises:
        RuntimeError: torch is already imported with another ATen capability (the pin would not
            take effect in this process: restart the kernel and run the setup cell first).
    """
    env = os.environ if environ is None else environ
    env.update(PINNED_ENV)
    if environ is None and "torch" in sys.modules and is_x86_64() and torch_capability() != "DEFAULT":
        raise RuntimeError(
            "torch was imported before the CPU kernels were pinned, so this process computes with "
            f"{torch_capability()} kernels; restart the kernel and run the setup cell (which pins them) before anything else"
        )
    return dict(PINNED_ENV)


def torch_capability() -> str:
    """The ATen CPU capability torch dispatches to (``DEFAULT``, ``AVX2``, ``AVX512``...); imports torch."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def kernels_pinned(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether ``environ`` holds the pinned values and, if torch is imported, torch obeys them."""
    env = os.environ if environ is None else environ
    if any(env.get(k) != v for k, v in PINNED_ENV.items()):
        return False
    if environ is None and "torch" in sys.modules and is_x86_64():
        return torch_capability() == "DEFAULT"
    return True


def require_pinned_kernels() -> None:
    """Raise ``RuntimeError`` with the fix if this process does not run on the pinned kernels (x86-64 only)."""
    if not is_x86_64():
        return
    if not kernels_pinned():
        missing = sorted(k for k, v in PINNED_ENV.items() if os.environ.get(k) != v)
        raise RuntimeError(
            "the quick profile runs on pinned CPU kernels, so that its numbers are the same on every machine, but "
            + (f"{', '.join(missing)} are not set as shared.kernels.PINNED_ENV says" if missing else
               f"torch was imported before the pin and computes with {torch_capability()} kernels")
            + ". Restart the kernel and run the chapter's setup cell first (it calls shared.kernels.pin_cpu_kernels()), "
            "or start Python with those variables set; profile='paper' does not pin."
        )


def kernel_signature() -> str:
    """A short name of the kernels this process computes with, for cache keys: ``pinned-v1`` or ``host``.

    Weights trained on the host's kernels must never be served to a pinned run (or the other way
    round), so every on-disk cache of trained weights keys on this.
    """
    return f"pinned-v{PIN_VERSION}" if kernels_pinned() else "host"
