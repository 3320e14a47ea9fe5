"""Reads PyTorch checkpoint files (`torch.save`) without importing torch and without
running any code from the file.

Both serialisations are supported:
  * zip (PyTorch >= 1.6): `<archive>/data.pkl` plus one raw file per storage,
  * legacy (pre-1.6): magic number, protocol version, system info, the object pickle, the
    list of storage keys, then each storage as an int64 element count and its raw bytes.

The pickle is read by `_RestrictedUnpickler`, which resolves only the handful of globals
a tensor state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
and friends, `torch.*Storage` types), each to a local NumPy re-implementation. Any other
global (e.g. `os.system` smuggled in through `__reduce__`) is refused before it can be
called, with a `CheckpointError` naming it. Tensors come back as NumPy arrays.
"""
from __future__ import annotations

import collections
import io
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from scvnet_jax.errors import CheckpointError
from scvnet_jax.safe_pickle import RestrictedUnpickler


# torch storage class name -> (numpy dtype, element size in bytes)
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # handled below: no native numpy bfloat16 without ml_dtypes
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _np_dtype(storage_name: str) -> np.dtype:
    if storage_name == "BFloat16Storage":
        import ml_dtypes  # a dependency of jax
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[storage_name])


class _StorageType:
    """Stands in for a `torch.<X>Storage` class inside the pickle."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _np_dtype(name)

    def __setstate__(self, state):  # a pickle's BUILD must not alter the shared instances
        raise CheckpointError("malformed checkpoint: it tries to modify a storage type")


class _StorageRef:
    """A storage named by a persistent id; its bytes are attached once read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.array: np.ndarray | None = None

    def resolve(self) -> np.ndarray:
        if self.array is None:
            raise CheckpointError(f"storage {self.key!r} has no data in the file (truncated?)")
        return self.array


class _TensorRef:
    """A tensor view (offset, size, stride) of a storage, materialised after loading."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, (_StorageRef, _StorageView)):
            raise CheckpointError("malformed tensor record in the pickle (storage is "
                                  f"{type(storage).__name__})")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.resolve()
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride):
            raise CheckpointError(f"tensor with negative size/stride {self.size}/{self.stride}")
        if not self.size:
            needed = self.offset + 1
        else:
            needed = self.offset + 1 + sum((n - 1) * st for n, st in zip(self.size, self.stride)
                                           if n > 0)
            if 0 in self.size:
                return np.zeros(self.size, flat.dtype)
        if needed > flat.size:
            raise CheckpointError(f"a tensor of shape {self.size} reads past the end of its "
                                  f"storage ({needed} > {flat.size} elements): the file is "
                                  "truncated or corrupt")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride])
        return np.array(view, copy=True)


class _StorageView:
    """Legacy-format view of a storage (view_metadata = (key, offset, size))."""

    def __init__(self, root: _StorageRef, offset: int, size: int):
        self.root, self.offset, self.size = root, int(offset), int(size)

    def resolve(self) -> np.ndarray:
        return self.root.resolve()[self.offset:self.offset + self.size]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(RestrictedUnpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages come from `storage_for(key, dtype, numel)`."""

    def __init__(self, file, storage_for, source: str):
        super().__init__(file, _ALLOWED_GLOBALS, source, CheckpointError,
                         "tensor data (OrderedDict, torch._utils._rebuild_*, torch.*Storage)")
        self._storage_for = storage_for
        self._source = source

    def persistent_load(self, pid: Any):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r:.80} "
                                  "(expected a torch storage record)")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]  # pid[3]: device, ignored
        root = self._storage_for(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy views: (view_key, offset, view_size)
            return _StorageView(root, view[1], view[2])
        return root


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: broken zip archive ({e}); the file is truncated or "
                              "corrupt") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: a zip file but not a PyTorch checkpoint (expected "
                                  "one '<archive>/data.pkl' entry)")
        prefix = pkl[0][: -len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        storages: dict[str, _StorageRef] = {}

        def storage_for(key, dtype, numel):
            if key not in storages:
                ref = _StorageRef(key, dtype, numel)
                entry = f"{prefix}data/{key}"
                try:
                    raw = zf.read(entry)
                except KeyError:
                    raise CheckpointError(f"{path}: storage entry {entry!r} is missing") from None
                except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
                    raise CheckpointError(f"{path}: cannot read {entry!r} ({e}); the file is "
                                          "truncated or corrupt") from None
                dt = dtype.newbyteorder("<" if order == "little" else ">")
                if len(raw) < ref.numel * dt.itemsize:
                    raise CheckpointError(f"{path}: storage {entry!r} has {len(raw)} bytes, "
                                          f"expected {ref.numel * dt.itemsize}")
                ref.array = np.frombuffer(raw, dt, count=ref.numel).astype(dtype.newbyteorder("="))
                storages[key] = ref
            return storages[key]

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise CheckpointError(f"{path}: cannot read {pkl[0]!r} ({e}); the file is "
                                  "truncated or corrupt") from None
        obj = _unpickle(io.BytesIO(data), storage_for, path)
        return _materialise(obj)


def _unpickle(f, storage_for, source):
    try:
        return _RestrictedUnpickler(f, storage_for, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickles raise many kinds of errors
        raise CheckpointError(f"{source}: the checkpoint's pickle is malformed "
                              f"({type(e).__name__}: {e})") from None


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        header = []
        for what in ("magic number", "protocol version", "system info"):
            try:
                header.append(_RestrictedUnpickler(f, _no_storage, path).load())
            except CheckpointError:
                raise
            except Exception:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (could not read the "
                                      f"legacy header's {what}; expected a torch.save file, "
                                      "zip or pre-1.6 format)") from None
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad legacy magic number "
                                  "or protocol version)")
        storages: dict[str, _StorageRef] = {}

        def storage_for(key, dtype, numel):
            if key not in storages:
                storages[key] = _StorageRef(key, dtype, numel)
            return storages[key]

        obj = _unpickle(f, storage_for, path)
        keys = _unpickle(f, _no_storage, path)
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: malformed legacy checkpoint (storage key list)")
        for key in keys:
            ref = storages.get(str(key))
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: the file ends before storage {key!r}; it is "
                                      "truncated")
            (numel,) = struct.unpack("<q", head)
            nbytes = numel * (ref.dtype.itemsize if ref else 1)
            if ref is None or numel < 0:
                raise CheckpointError(f"{path}: storage {key!r} is listed but never used, or "
                                      "has a negative size: corrupt file")
            raw = f.read(nbytes)
            if len(raw) < nbytes:
                raise CheckpointError(f"{path}: storage {key!r} has {len(raw)} of {nbytes} "
                                      "bytes; the file is truncated")
            ref.array = np.frombuffer(raw, ref.dtype.newbyteorder("<"), count=numel).astype(
                ref.dtype.newbyteorder("="))
        return _materialise(obj)


def _no_storage(*args):
    raise CheckpointError("unexpected tensor data in a checkpoint header")


def load_torch_file(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` file into Python objects with NumPy arrays for tensors.

    Raises:
      CheckpointError: no such file, not a PyTorch checkpoint, truncated, or holding anything
        but data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return _load_zip(path)
    if head[:1] == b"\x80":
        return _load_legacy(path)
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with {head!r}; "
                          "expected a zip archive or a pickle written by torch.save)")
