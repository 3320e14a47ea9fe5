"""An index larger than memory: descriptors in memory-mapped shards, IVF-PQ lists on disk.

    writer = ondisk.ShardWriter(folder, dim)            # float16 shards of `shard_rows` rows
    for X in chunks: writer.add(X)                      # (n, D), written as they fill
    rows = writer.finish()                              # a Rows over every shard
    backend = ondisk.build_ivfpq(rows, folder)          # trained on a sample, filled shard
                                                        # by shard, its lists in folder
    backend = ondisk.DiskIVFPQ.open(folder, rows)       # later: nothing read whole
    scores, ids = ondisk.rescored(backend, rows, Q, k, shortlist)   # exactly re-scored

The layout of `folder` (every file written atomically; a damaged one is one InputError
naming it, found when the folder is opened, before any search):
  descriptors/shard-00000.npy ...   float16 (rows, D), opened with mmap
  ivfpq.faiss, ivfpq.ivfdata        the faiss index (IndexPreTransform(PCA) over an
                                    IndexIVFPQ, or a bare IndexIVFPQ) and its inverted
                                    lists (faiss's OnDiskInvertedLists, memory-mapped)

`Rows` reads any rows of the shards (row numbers, slices) without reading the others;
`rescored` takes a backend's approximate shortlist and re-scores it exactly from the
stored vectors (float16 -> float32 dot products, the same values exact search computes on
the same index), so approximation only decides which rows are looked at.
The search index (`scvnet_jax.search.Index`, a folder) and `benchmarks/index_10m.py` use it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from scvnet_jax.errors import InputError, OutputError

SHARD_ROWS = 1 << 18                    # 256 Ki rows: 1 GiB of float16 2048-d vectors
FAISS_FILE, IVFDATA_FILE = "ivfpq.faiss", "ivfpq.ivfdata"
SHARD_DIR = "descriptors"


@contextlib.contextmanager
def _faiss_prints_to_stderr():
    """faiss's C++ prints (the on-disk lists' "resizing ...", "IO_FLAG_ONDISK_SAME_DIR:
    updating ...") go to standard output, where `--json` answers go: sent to standard
    error while faiss reads or writes an on-disk index."""
    import ctypes
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("an on-disk index needs the faiss extra: pip install "
                         "'scvnet_jax[faiss]'") from None
    return faiss


class Rows:
    """Row-addressable view of float16 shards (opened with mmap: only the rows read are
    paged in). `shape`, `dtype`, `len`; `rows[i]`, `rows[a:b]`, `rows[int array]` return
    numpy arrays; `np.asarray(rows)` reads everything (small indexes only)."""

    def __init__(self, files: list, counts: list | None = None, dim: int | None = None):
        self.files = [Path(f) for f in files]
        self._maps = []
        for i, f in enumerate(self.files):
            try:
                m = np.load(f, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise InputError(f"{f}: a descriptor shard of the index is missing") from None
            except Exception as e:     # noqa: BLE001  truncated, not .npy, bad header
                raise InputError(f"{f}: damaged descriptor shard ({type(e).__name__}: {e}); "
                                 "rebuild the index") from None
            want_rows = None if counts is None else int(counts[i])
            if (m.ndim != 2 or m.dtype != np.float16 or (dim is not None and m.shape[1] != dim)
                    or (want_rows is not None and m.shape[0] != want_rows)):
                raise InputError(f"{f}: damaged descriptor shard: float16 of shape "
                                 f"({want_rows if want_rows is not None else 'n'}, "
                                 f"{dim if dim is not None else 'D'}) expected, found "
                                 f"{m.dtype} {m.shape}; rebuild the index")
            self._maps.append(m)
        self.dim = int(dim if dim is not None else (self._maps[0].shape[1] if self._maps else 0))
        self.starts = np.cumsum([0] + [m.shape[0] for m in self._maps]).astype(np.int64)
        self.shape = (int(self.starts[-1]), self.dim)
        self.dtype = np.dtype(np.float16)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype):
        return np.asarray(self, dtype)

    def shards(self):
        """(first row, the shard's mmap) for each shard, in order."""
        return zip(self.starts[:-1].tolist(), self._maps)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            parts = []
            for first, m in self.shards():
                a, b = max(start, first), min(stop, first + len(m))
                if a < b:
                    parts.append(np.asarray(m[a - first:b - first]))
            return (np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float16))
        if np.isscalar(key):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} of {n}")
            i %= n
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self._maps[s][i - self.starts[s]])
        rows = np.asarray(key, np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"rows out of range for {n}")
        rows = rows % max(n, 1)
        out = np.empty(rows.shape + (self.dim,), np.float16)
        flat, dst = rows.reshape(-1), out.reshape(-1, self.dim)
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        if 1 < len(flat) <= PARALLEL_ROWS:      # a shortlist: its reads in flight together
            self._pread(flat - self.starts[shard], shard, dst)
            return out
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = flat[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")     # sequential reads within a shard
            dst[sel[order]] = self._maps[s][local[order]]
        return out


    def _pread(self, local, shard, dst) -> None:
        """Rows read with `os.pread` from READ_THREADS threads at once: a shortlist's rows
        are scattered over the shards, so on a cold page cache each is a disk read, and a
        disk serves many in flight about as fast as one (measured at 10 M: see the docs)."""
        if not hasattr(self, "_fds"):
            self._fds = [os.open(f, os.O_RDONLY) for f in self.files]
        size = self.dim * 2

        def read(j):
            s = int(shard[j])
            at = self._maps[s].offset + int(local[j]) * size
            return j, os.pread(self._fds[s], size, at)
        for j, data in _read_pool().map(read, range(len(local))):
            dst[j] = np.frombuffer(data, np.float16)

    def __del__(self, _close=os.close):
        for fd in getattr(self, "_fds", ()):
            try:
                _close(fd)
            except OSError:
                pass


PARALLEL_ROWS = 4096          # row reads up to this many go through `Rows._pread`
READ_THREADS = 32
_POOL: list = []


def _read_pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ondisk-read"))
    return _POOL[0]


class ShardWriter:
    """Appends float16 rows to shards in `folder/descriptors`, each written whole to a
    temporary file and renamed when full (`finish` writes the last): a killed build leaves
    only finished shards, and `skip_done` reuses those of a rerun with the same shard size."""

    def __init__(self, folder, dim: int, shard_rows: int = SHARD_ROWS, skip_done: bool = False):
        self.folder = Path(folder) / SHARD_DIR
        self.dim, self.shard_rows, self.skip_done = int(dim), int(shard_rows), skip_done
        self.files: list[Path] = []
        self.counts: list[int] = []
        self._pending: list[np.ndarray] = []
        self._n = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.folder}: cannot create it ({e.strerror or e})") from None

    def next_is_done(self) -> bool:
        """With skip_done: whether the next shard already exists whole (then `skip` it
        instead of computing its rows)."""
        f = self._name(len(self.files))
        if not (self.skip_done and f.is_file()):
            return False
        try:
            m = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception:      # noqa: BLE001  a damaged leftover: written again
            return False
        return m.dtype == np.float16 and m.shape == (self.shard_rows, self.dim)

    def skip(self) -> None:
        """Counts the existing next shard as written (after `next_is_done`)."""
        self.files.append(self._name(len(self.files)))
        self.counts.append(self.shard_rows)

    def _name(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.npy"

    def add(self, X) -> None:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InputError(f"descriptors: expected (n, {self.dim}), got {X.shape}")
        self._pending.append(X.astype(np.float16))
        self._n += len(X)
        while self._n >= self.shard_rows:
            self._write(self.shard_rows)

    def _write(self, rows: int) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        out, rest = block[:rows], block[rows:]
        self._pending, self._n = ([rest] if len(rest) else []), len(rest)
        path = self._name(len(self.files))
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(out), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from None
        self.files.append(path)
        self.counts.append(len(out))

    def finish(self) -> Rows:
        if self._n:
            self._write(self._n)
        return Rows(self.files, self.counts, self.dim)


def default_layout(n: int, dim: int) -> dict:
    """The IVF-PQ settings used unless given, from the index's size: a PCA to 256
    dimensions (when D > 256 and there are enough vectors to estimate it), ~4 sqrt(N) lists
    (at least 39 training vectors each), 32 sub-vectors of 8 bits (fewer bits below 256
    vectors), 64 lists probed (at 10 M, `benchmarks/index_10m.py`: recall@10 0.955 after
    re-scoring a shortlist of 100, against 0.92 with 32, for ~1 ms more per query)."""
    pca = 256 if dim > 256 and n >= 4 * 256 else 0
    d = pca or dim
    nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))
    m = next(m for m in (32, 16, 8, 4, 2, 1) if d % m == 0)
    nbits = max(1, min(8, int(math.log2(max(n, 2)))))
    return {"pca": pca, "nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(64, nlist)}


def check_layout(shape, **given) -> dict:
    """The layout for `shape` (N, D): `default_layout` with the `given` values that are not
    None, checked (one InputError naming the value) before any work."""
    n, dim = shape
    lay = {**default_layout(n, dim), **{k: v for k, v in given.items() if v is not None}}
    unknown = set(lay) - {"pca", "nlist", "m", "nbits", "nprobe"}
    if unknown:
        raise InputError(f"layout: unknown setting(s) {sorted(unknown)} (pca, nlist, m, "
                         "nbits, nprobe)")
    for key, value in lay.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
                0 if key == "pca" else 1):
            raise InputError(f"{key}: expected a {'non-negative' if key == 'pca' else 'positive'}"
                             f" integer, got {value!r}")
    if lay["pca"] > dim:
        raise InputError(f"pca {lay['pca']}: at most the descriptors' dimension {dim}")
    d = lay["pca"] or dim
    if d % lay["m"]:
        raise InputError(f"m {lay['m']}: must divide the dimension it splits ({d})")
    if lay["nbits"] > 8 or 2 ** lay["nbits"] > max(n, 2) and lay["nbits"] > 1:
        raise InputError(f"nbits {lay['nbits']}: at most 8 and 2**nbits at most the number "
                         f"of vectors ({n})")
    if lay["nlist"] > n:
        raise InputError(f"nlist {lay['nlist']}: at most the number of vectors ({n})")
    lay["nprobe"] = min(lay["nprobe"], lay["nlist"])
    return {k: int(v) for k, v in lay.items()}


class DiskIVFPQ:
    """The faiss IVF-PQ index of an on-disk folder: its inverted lists memory-mapped from
    `ivfpq.ivfdata`. `search` gives approximate scores; `rescored` makes them exact."""
    name = "faiss"
    kind = "ivfpq-disk"

    def __init__(self, index, layout: dict):
        self.index, self.layout = index, dict(layout)
        _faiss().extract_index_ivf(index).nprobe = int(layout["nprobe"])

    @classmethod
    def open(cls, folder, layout: dict, n: int, dim: int) -> "DiskIVFPQ":
        faiss = _faiss()
        path = Path(folder) / FAISS_FILE
        for f in (path, Path(folder) / IVFDATA_FILE):
            if not f.is_file():
                raise InputError(f"{f}: the index's faiss file is missing; rebuild the index")
        try:
            with _faiss_prints_to_stderr():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except Exception as e:      # noqa: BLE001  faiss raises RuntimeError on junk
            raise InputError(f"{path}: damaged faiss index ({str(e).splitlines()[0][:200]}); "
                             "rebuild the index") from None
        ivf = faiss.extract_index_ivf(index)
        size = os.path.getsize(Path(folder) / IVFDATA_FILE)
        if (index.ntotal, index.d) != (n, dim) or size < _ivfdata_bytes(ivf):
            raise InputError(f"{path}: its faiss index holds {index.ntotal} x {index.d} "
                             f"vectors (lists {size} bytes), the descriptors {n} x {dim}; "
                             "rebuild the index")
        return cls(index, layout)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, Q, k: int):
        scores, ids = self.index.search(np.ascontiguousarray(Q, np.float32), k)
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids.astype(np.int64)


def _ivfdata_bytes(ivf) -> int:
    """The least size of the lists file: every list's codes and ids."""
    inv = ivf.invlists
    return sum(inv.list_size(i) for i in range(ivf.nlist)) * (ivf.code_size + 8)


def build_ivfpq(rows: Rows, folder, *, layout: dict | None = None, train_size: int = 131072,
                seed: int = 0, progress: bool = False) -> DiskIVFPQ:
    """Trains an IVF-PQ index (`default_layout` unless `layout` says otherwise) on a
    sample of `train_size` rows, adds the shards one by one and writes it with its lists
    on disk (`folder/ivfpq.faiss`, `ivfpq.ivfdata`). Memory: the sample, one shard in
    float32 and the codes (N x (m + 8) bytes) before they go to disk."""
    from tqdm.auto import tqdm
    faiss = _faiss()
    n, dim = rows.shape
    if n == 0:
        raise InputError("an on-disk index needs at least one vector")
    lay = check_layout((n, dim), **(layout or {}))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
    train = np.ascontiguousarray(rows[sample], np.float32)
    d = lay["pca"] or dim
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQ(quantizer, d, int(lay["nlist"]), int(lay["m"]), int(lay["nbits"]),
                           faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    ivf.pq.cp.min_points_per_centroid = 1   # few vectors: no warning per sub-vector (the
                                            # shortlist is re-scored exactly anyway)
    index = ivf
    if lay["pca"]:
        pca = faiss.PCAMatrix(dim, d, 0, False)
        index = faiss.IndexPreTransform(pca, ivf)
    index.train(train)
    del train
    with tqdm(total=n, desc="ivf-pq", unit="vec", dynamic_ncols=True, mininterval=2.0,
              disable=not progress) as bar:
        for first, m in rows.shards():
            for a in range(0, len(m), 65536):
                block = np.ascontiguousarray(m[a:a + 65536], np.float32)
                index.add_with_ids(block, np.arange(first + a, first + a + len(block),
                                                    dtype=np.int64))
                bar.update(len(block))
    folder = Path(folder)
    data, path = folder / IVFDATA_FILE, folder / FAISS_FILE
    tmp_data = folder / f".{IVFDATA_FILE}.tmp"
    if tmp_data.exists():
        tmp_data.unlink()
    try:
        with _faiss_prints_to_stderr():
            ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp_data))
            ptrs = faiss.InvertedListsPtrVector()
            ptrs.push_back(ivf.invlists)
            ondisk.merge_from_multiple(ptrs.data(), ptrs.size(), False)
            ondisk.filename = str(data)               # where it is found after the rename
            ivf.replace_invlists(ondisk, True)
            ondisk.this.disown()
            os.replace(tmp_data, data)
            tmp = folder / f".{FAISS_FILE}.tmp"
            faiss.write_index(index, str(tmp))
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"{folder}: cannot write the faiss index ({e})") from None
    return DiskIVFPQ.open(folder, lay, n, dim)


def rescored(backend, rows, Q, k: int, shortlist: int):
    """Each query's top `shortlist` (>= k) rows from the backend, re-scored exactly from
    the stored vectors and sorted: (scores (nq, S) float32, ids (nq, S) int64), best first,
    ties to the lower row; -1 / -inf where fewer rows came back. The dot products are
    float32 over the stored vectors, as exact search computes them."""
    Q = np.asarray(Q, np.float32)
    S = max(int(k), min(int(shortlist), len(rows)))
    _, cand = backend.search(Q, S)
    scores = np.full((len(Q), S), -np.inf, np.float32)
    ids = np.full((len(Q), S), -1, np.int64)
    for i, c in enumerate(cand):
        c = np.unique(c[c >= 0])                     # sorted: ties go to the lower row
        if not len(c):
            continue
        s = rows[c].astype(np.float32) @ Q[i]
        order = np.argsort(-s, kind="stable")
        scores[i, :len(order)], ids[i, :len(order)] = s[order], c[order]
    return scores, ids


def exact_topk(rows, Q, k: int, block: int = 65536, progress: bool = False):
    """The exact top k of each query over every row, streamed block by block through the
    shards (memory: one block in float32): (scores, ids) (nq, k), ties to the lower row."""
    from tqdm.auto import tqdm
    Q = np.asarray(Q, np.float32)
    best_s = np.full((len(Q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(Q), 0), np.int64)
    with tqdm(total=len(rows), desc="exact", unit="vec", dynamic_ncols=True, mininterval=2.0,
              disable=not progress) as bar:
        for first, m in rows.shards():
            for a in range(0, len(m), block):
                X = np.asarray(m[a:a + block], np.float32)
                s = Q @ X.T
                ids = np.broadcast_to(np.arange(first + a, first + a + len(X)), s.shape)
                s, ids = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
                kk = min(k, s.shape[1])
                top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
                best_s = np.take_along_axis(s, top, 1)
                best_i = np.take_along_axis(ids, top, 1)
                bar.update(len(X))
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at(backend, rows, Q, k: int = 10, shortlist: int = 100, exact=None) -> float:
    """Recall@k of the re-scored shortlist against exact search: the mean fraction of each
    query's exact top k found (`exact`: its ids when already computed)."""
    k = min(k, len(rows))
    want = exact_topk(rows, Q, k)[1] if exact is None else np.asarray(exact)[:, :k]
    got = rescored(backend, rows, Q, k, shortlist)[1][:, :k]
    from scvnet_jax.engine.backends import overlap_at
    return overlap_at(want, got, k)


class Strings:
    """A list of strings on disk (`NAME.bin`: UTF-8, `NAME.offsets.npy`: N + 1 int64
    offsets), read one at a time: `strings[i]`, `len`, iteration. `prefix`: (old, new) swaps
    a leading `old` for `new` on the way out (an index folder whose collection moved)."""

    def __init__(self, folder, name: str, n: int, prefix: tuple | None = None):
        base = Path(folder) / name
        self.where, self.prefix = (base, prefix)
        try:
            self.offsets = np.load(f"{base}.offsets.npy", mmap_mode="r", allow_pickle=False)
            self.blob = np.memmap(f"{base}.bin", np.uint8, mode="r") if os.path.getsize(
                f"{base}.bin") else np.zeros(0, np.uint8)
        except FileNotFoundError as e:
            raise InputError(f"{e.filename}: a file of the index is missing") from None
        except Exception as e:     # noqa: BLE001
            raise InputError(f"{base}.offsets.npy: damaged ({type(e).__name__}: {e}); "
                             "rebuild the index") from None
        if (self.offsets.shape != (n + 1,) or self.offsets.dtype != np.int64
                or (n and int(self.offsets[-1]) != len(self.blob))):
            raise InputError(f"{base}.bin: damaged: {n} strings expected, the offsets "
                             f"{self.offsets.dtype} {self.offsets.shape} and "
                             f"{len(self.blob)} bytes do not agree; rebuild the index")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"string {i} of {len(self)}")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        s = bytes(self.blob[a:b]).decode("utf-8", "surrogateescape")
        if self.prefix and s.startswith(self.prefix[0]):
            s = self.prefix[1] + s[len(self.prefix[0]):]
        return s

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        return (isinstance(other, (list, Strings)) and len(self) == len(other)
                and all(a == b for a, b in zip(self, other)))

    def with_prefix(self, old: str, new: str) -> "Strings":
        out = object.__new__(Strings)
        out.__dict__.update(self.__dict__, prefix=(old, new))
        return out

    @staticmethod
    def write(folder, name: str, strings) -> None:
        """Writes `strings` (any iterable) as NAME.bin and NAME.offsets.npy, streaming."""
        from scvnet_jax import files
        base = Path(folder) / name
        offsets = [0]
        tmp = base.with_name(f".{base.name}.bin.tmp")
        try:
            with open(tmp, "wb") as f:
                for s in strings:
                    b = str(s).encode("utf-8", "surrogateescape")
                    f.write(b)
                    offsets.append(offsets[-1] + len(b))
            os.replace(tmp, f"{base}.bin")
        except OSError as e:
            raise OutputError(f"{base}.bin: cannot write it ({e.strerror or e})") from None
        files.atomic_save_npy(f"{base}.offsets.npy", np.asarray(offsets, np.int64))


def write_manifest(folder, manifest: dict) -> None:
    from scvnet_jax import files
    files.atomic_write_text(Path(folder) / "manifest.json", json.dumps(manifest, indent=1))


def read_manifest(folder, format_name: str) -> dict:
    """The folder's manifest.json, checked to be of `format_name` (one InputError naming
    the file otherwise)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{folder}: not an index folder (no manifest.json; expected a "
                         "folder written by `scvnet-search convert`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: damaged ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise InputError(f"{path}: not a scvnet_jax index folder (expected format "
                         f"{format_name})")
    return manifest
