"""Unpickling that can only build data: every global a pickle names must be in an
explicit allow-list, and each allowed name resolves to an object we chose. Anything else
(os.system through __reduce__, eval, arbitrary classes) is refused before it is called.
Used for PyTorch checkpoints (convert/torch_file.py) and revisitop ground-truth files."""
from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping


class RestrictedUnpickler(pickle.Unpickler):
    """`allowed` maps (module, name) to the object that name resolves to; `error` builds the
    exception raised for anything else, from a message."""

    def __init__(self, file, allowed: Mapping[tuple[str, str], Any], source: str,
                 error: Callable[[str], Exception], what: str):
        super().__init__(file)
        self._allowed, self._source, self._error, self._what = allowed, source, error, what

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise self._error(
                f"{self._source}: refusing to load the global '{module}.{name}' from the "
                f"pickle. Only {self._what} is allowed; this file tries to create or call "
                "something else, so it is either not the expected kind of file or it was "
                "crafted to run code.") from None


def numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled NumPy array or scalar needs, under NumPy 1 and 2 names."""
    import numpy as np
    from numpy._core import multiarray

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = multiarray._reconstruct
        out[(mod, "scalar")] = multiarray.scalar
    return out


def load(file, allowed, source: str, error: Callable[[str], Exception], what: str) -> Any:
    return RestrictedUnpickler(file, allowed, source, error, what).load()
