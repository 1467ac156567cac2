"""Page-locked ("pinned") host memory for uploads to a CUDA device.

A copy from ordinary (pageable) memory to the GPU goes through a driver staging
buffer at a few GB/s and holds the GIL for its whole length (``OrtValue.update_inplace``);
from page-locked memory it is a direct DMA, several times faster. The HDF5
reader's recycled blocks are registered once (``cudaHostRegister``) when the
batches they hold go to the GPU as they are (`stampclf._session.BatchRunner`).

The CUDA runtime used is the one ONNX Runtime's CUDA provider has already loaded
into this process (found in ``/proc/self/maps``): nothing is loaded that is not
there already, and where it is not (CPU, another platform) nothing is pinned.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

__all__ = ["pin", "unpin"]

# cudaHostRegisterPortable: pinned for every CUDA context, not only the current one
_PORTABLE = 1
_lock = threading.Lock()
_lib: Any = None
_looked = False
#: the finalizers of pinned arrays, by id (an entry goes when its array does: the finalizer removes it)
_pinned: dict[int, Any] = {}


def _cudart() -> Any:
    """The process's loaded CUDA runtime library, or None."""
    global _lib, _looked
    with _lock:
        if not _looked:
            _looked = True
            try:
                with open("/proc/self/maps") as fh:
                    path = next((ln.split()[-1] for ln in fh if "/libcudart.so" in ln), None)
                if path is not None:
                    lib = ctypes.CDLL(path)
                    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
                    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
                    for fn in (lib.cudaHostRegister, lib.cudaHostUnregister, lib.cudaGetLastError):
                        fn.restype = ctypes.c_int
                    _lib = lib
            except (OSError, AttributeError):  # no /proc, or a library without these symbols
                _lib = None
        return _lib


def pin(array: Any) -> bool:
    """Page-lock *array*'s memory (C-contiguous); False if not done.

    Undone by `unpin`, or else when the array is freed (a finalizer: registered
    memory must never go back to the allocator still registered). Best effort: a
    failure leaves the array as it was, and clears the CUDA runtime's last error so
    that no later kernel launch check reports it.
    """
    lib = _cudart()
    if lib is None or not array.nbytes or not array.flags.c_contiguous or not array.flags.owndata:
        return False  # (a view: its memory's lifetime is another array's)
    if id(array) in _pinned:
        return False
    ptr = array.ctypes.data
    if lib.cudaHostRegister(ptr, array.nbytes, _PORTABLE) != 0:
        lib.cudaGetLastError()
        return False
    done = weakref.finalize(array, _unregister, lib, ptr, id(array))
    done.atexit = False  # the process's end frees it all; no CUDA calls while CUDA shuts down
    _pinned[id(array)] = done
    return True


def unpin(array: Any) -> None:
    """Undo `pin` now (nothing for an array that is not pinned)."""
    done = _pinned.get(id(array))
    if done is not None:
        done()


def _unregister(lib: Any, ptr: int, key: int) -> None:
    _pinned.pop(key, None)
    if lib.cudaHostUnregister(ptr) != 0:
        lib.cudaGetLastError()
