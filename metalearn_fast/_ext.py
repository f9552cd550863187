"""Loads the compiled extension metalearn_fast._C once, and says why when it does not.

METALEARN_FAST_BACKEND selects the backend: ``auto`` (default: the extension when it loads,
else the pure-torch fallback with one warning), ``torch`` (always the fallback) or
``extension`` (the extension or an ImportError). METALEARN_FAST_CPU_SIMD (``none``, ``avx2``, ``avx512``)
lowers the instruction set of the extension's hand-written CPU kernels (default: the best the CPU has).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from types import ModuleType
from typing import Optional

BACKENDS = ("auto", "torch", "extension")

_module: Optional[ModuleType] = None
_reason: str = ""
_loaded = False


def requested_backend() -> str:
    value = os.environ.get("METALEARN_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"METALEARN_FAST_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


CPU_SIMD = ("none", "avx2", "avx512")


def _check_cpu_simd() -> None:
    value = os.environ.get("METALEARN_FAST_CPU_SIMD", "")
    if value and value not in CPU_SIMD:
        raise ValueError(f"METALEARN_FAST_CPU_SIMD must be one of {', '.join(CPU_SIMD)}, got {value!r}")


def load() -> Optional[ModuleType]:
    """The extension module, or None (with the reason kept for :func:`reason`)."""
    global _module, _reason, _loaded
    if _loaded:
        return _module
    _loaded = True
    backend = requested_backend()
    _check_cpu_simd()
    if backend == "torch":
        _reason = "METALEARN_FAST_BACKEND=torch selects the pure-torch fallback"
        return None
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        if importlib.util.find_spec(f"{__package__}._C") is None:
            raise ModuleNotFoundError("metalearn_fast was installed without it (no working C++ compiler at "
                                      "install time, or METALEARN_FAST_EXTENSION=0)")
        from . import _C as module
    except Exception as error:  # a missing, stale or broken build must never break the import
        _reason = f"the compiled extension did not load: {type(error).__name__}: {error}"
        if backend == "extension":
            raise ImportError(f"METALEARN_FAST_BACKEND=extension but {_reason}") from error
        warnings.warn(
            f"metalearn_fast: {_reason}. Running on the pure-torch fallback (same results, slower). "
            "Rebuild with `pip install --no-build-isolation -e .` and see `metalearn-fast info`; "
            "METALEARN_FAST_BACKEND=torch selects the fallback without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _module = module
    return module


def reason() -> str:
    """Why the extension is not active ('' when it is)."""
    load()
    return _reason
