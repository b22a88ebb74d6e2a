"""Backend plumbing: resolving an array namespace, mapping dtypes, naming backends.

Everything here runs once, at construction time; nothing here is on the hot path.

The namespaces handed out are the ones array-api-compat would return for an array
of that library (``array_api_compat.numpy``, ``array_api_compat.torch``,
``array_api_compat.cupy``) and ``array_api_strict`` itself, so code written
against the standard runs unchanged on each.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .errors import BackendUnavailableError, DtypeError, UnsupportedBackendError

__all__ = [
    "BACKEND_NAMES",
    "FLOATING_DTYPE_NAMES",
    "Backend",
    "dtype_name",
    "floating_dtype",
    "get_namespace",
    "load_backend",
    "to_numpy",
]

#: Names accepted by :func:`load_backend`, the test fixture and the CLI.
BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "torch-cuda", "cupy")

#: Real floating dtypes a cache may hold; a backend may lack some (no float16 in
#: the standard, so array-api-strict has none; only torch has bfloat16).
FLOATING_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def get_namespace(xp: Any = None, dtype: Any = None) -> ModuleType:
    """Return the standard-conforming namespace for ``xp``.

    ``xp`` may be a library module (``numpy``, ``torch``, ``cupy``,
    ``array_api_strict``) or its array-api-compat wrapper. With ``xp=None`` the
    namespace is inferred from ``dtype``'s library (a torch or array-api-strict
    dtype), else NumPy.

    Raises
    ------
    UnsupportedBackendError
        For JAX (immutable arrays: no in-place cache can exist there) and for a
        module that does not implement the array API.
    BackendUnavailableError
        For CuPy on a machine without a usable GPU.
    """
    if xp is None:
        library = type(dtype).__module__.split(".")[0] if dtype is not None else "numpy"
        if library == "torch":
            import torch as xp
        elif library == "array_api_strict":
            import array_api_strict as xp
        else:
            return importlib.import_module("array_api_compat.numpy")
    if array_api_compat.is_jax_namespace(xp):
        raise UnsupportedBackendError(
            "JAX arrays are immutable, so a preallocated cache written in place cannot "
            "exist there (every append would silently copy the whole buffer); use numpy, "
            "torch, cupy or array_api_strict"
        )
    if array_api_compat.is_numpy_namespace(xp):
        return importlib.import_module("array_api_compat.numpy")
    if array_api_compat.is_torch_namespace(xp):
        return importlib.import_module("array_api_compat.torch")
    if array_api_compat.is_cupy_namespace(xp):
        import cupy

        if not cupy.is_available():
            raise BackendUnavailableError(
                "CuPy is installed but has no GPU here (cupy.is_available() is False)"
            )
        return importlib.import_module("array_api_compat.cupy")
    if array_api_compat.is_array_api_strict_namespace(xp):
        return xp
    if isinstance(xp, ModuleType) and hasattr(xp, "__array_api_version__"):
        return xp
    raise UnsupportedBackendError(
        f"{getattr(xp, '__name__', xp)!r} is not an array API namespace "
        "(expected numpy, torch, cupy, array_api_strict or a module with __array_api_version__)"
    )


def dtype_name(dtype: Any) -> str:
    """The standard name (``"float16"``...) of a dtype given as any library's object or a str."""
    if isinstance(dtype, str):
        return dtype
    library = type(dtype).__module__.split(".")[0]
    if library in ("torch", "array_api_strict"):
        return str(dtype).rsplit(".", 1)[-1]
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise DtypeError(f"unrecognised dtype {dtype!r}") from None


def floating_dtype(xp: ModuleType, dtype: Any) -> Any:
    """Map ``dtype`` (any library's dtype object, or its name) to ``xp``'s floating dtype.

    Raises ``DtypeError`` for a non-floating dtype or one that ``xp`` lacks.
    """
    name = dtype_name(dtype)
    if name not in FLOATING_DTYPE_NAMES:
        raise DtypeError(
            f"a KV cache holds a real floating dtype ({', '.join(FLOATING_DTYPE_NAMES)}); "
            f"got {name}"
        )
    found = getattr(xp, name, None)
    if found is None:
        raise DtypeError(f"{xp.__name__} has no {name} dtype")
    return found


@dataclass(frozen=True)
class Backend:
    """A named backend: its namespace and the device arrays are placed on."""

    name: str
    xp: ModuleType
    device: Any = None


def load_backend(name: str) -> Backend:
    """Import a backend by name (one of :data:`BACKEND_NAMES`).

    Raises ``BackendUnavailableError`` with the reason (not installed; no GPU) and
    ``ValueError`` for an unknown name.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    module = {"torch-cuda": "torch"}.get(name, name)
    try:
        library = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"{module} is not installed ({exc})") from None
    if name == "torch-cuda":
        if not library.cuda.is_available():
            raise BackendUnavailableError("torch is installed but has no GPU here (CUDA)")
        return Backend(name, get_namespace(library), library.device("cuda", 0))
    if name == "cupy" and not library.is_available():
        raise BackendUnavailableError(
            "cupy is installed but has no GPU here (cupy.is_available() is False)"
        )
    device = library.device("cpu") if name == "torch" else None
    return Backend(name, get_namespace(library), device)


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any supported backend to a host NumPy array."""
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
