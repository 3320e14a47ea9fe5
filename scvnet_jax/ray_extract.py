"""Extraction as a Ray Data job: `update_index(..., ray=ADDRESS)`, `scvnet-search index
--ray ADDRESS`.

The new images of an index update, in chunks of `chunk_size`, go through a Ray Data
`map_batches` stage whose callable class (`ChunkExtractor`) loads and compiles the model
once per actor and runs the engine's own chunk step (`search._extract_chunk`: read,
padded size-bucket batches over the actor's devices, the chunk saved as a part of
`<index>.parts/`, a folder the driver and every worker see; each part holds its files'
digests, the model key and the descriptors). The driver gathers the parts as chunks
finish, keeps `<index>.parts/ray_manifest.json` (the job's chunks done so far and the files
skipped) and writes the index as the one-process path does; a killed job leaves its
finished parts, which the next run reuses (content-keyed: by each file's digest and the
model key), so only what is missing is extracted again. Unreadable files are skipped and
listed (or stop the run under on_error="raise"). The descriptors are the one-process
path's: bit for bit with an integer `bucket`; with "auto" to float rounding (an actor
picks padded shapes from what it compiled before, as any process does).

Actors: one per GPU of the cluster (each with num_gpus=1), or without GPUs one per node
(each takes a node's CPUs); `actors` sets the count. Each actor runs with
XLA_PYTHON_CLIENT_PREALLOCATE=false (several processes may share a node's accelerators)
and the driver's JAX compilation cache folder.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scvnet_jax.errors import InputError, ScvnetError


class ChunkExtractor:
    """The Ray Data stage: a model per actor; each row of a batch is one chunk (JSON:
    rows, paths, digests), answered with JSON (rows described, skipped, error, part)."""

    def __init__(self, weights: str, family: str, dtype: str, key: str, parts: str,
                 max_side: int, batch_size: int, bucket, on_error: str):
        from tqdm.auto import tqdm

        from scvnet_jax import api, images, search
        from scvnet_jax.engine import extract
        images.set_max_side(max_side)
        self.model = api.load(api.demo_model_path() if weights == "demo" else weights)
        if search.model_key(self.model, family, dtype) != key:
            raise InputError(f"weights {weights}: on this Ray worker they give other "
                             "descriptors than the driver's model")
        self.args = (key, Path(parts), extract.spec_of(family), dtype, batch_size, bucket,
                     on_error)
        self.pool = ThreadPoolExecutor(4)
        self.bar = tqdm(disable=True)

    def __call__(self, batch: dict) -> dict:
        from scvnet_jax import search
        out = []
        for text in batch["chunk"]:
            job = json.loads(str(text))
            rows = [int(i) for i in job["rows"]]
            paths = dict(zip(rows, job["paths"]))
            digests = dict(zip(rows, job["digests"]))
            part = f"chunk_{uuid.uuid4().hex}.npz"
            key, parts, spec, dtype, batch_size, bucket, on_error = self.args
            good, skipped, D, err = search._extract_chunk(
                self.model, rows, paths, digests, key, parts, spec, dtype, batch_size,
                bucket, on_error, self.pool, self.bar, False, part)
            out.append(json.dumps({"rows": rows, "good": good, "skipped": skipped,
                                   "error": err, "part": part if D is not None else None}))
        return {"result": np.array(out, dtype=object)}


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--ray needs the ray extra: pip install 'scvnet_jax[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """Before any work: the ray extra is installed and, for a HOST:PORT address, something
    listens there (Ray itself would retry a dead address for minutes)."""
    _ray()
    if not isinstance(address, str) or not address:
        raise InputError(f"--ray: expected a Ray cluster's address (auto, HOST:PORT or "
                         f"ray://HOST:PORT), got {address!r}")
    if address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    import socket
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise InputError(f"--ray {address}: cannot connect to the Ray cluster "
                         f"({getattr(e, 'strerror', None) or e})") from None


def extract_chunks(address: str, chunks, paths, digests, key, parts, family, dtype, weights,
                   batch_size, bucket, on_error, actors, bar):
    """Yields (rows described, skipped, descriptors, error) per chunk as the Ray job
    finishes them (the order of `_extract_chunks`' answers, not necessarily of `chunks`)."""
    from scvnet_jax import files, images, search
    if not chunks:
        return
    if weights != "demo":
        weights = str(Path(weights).expanduser().resolve())
    ray = _ray()
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_COMPILATION_CACHE_MAX_SIZE", "SCVNET_MAX_IMAGE_PIXELS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": env})
    except Exception as e:      # noqa: BLE001  ConnectionError, ValueError, RuntimeError
        raise InputError(f"--ray {address}: cannot connect to the Ray cluster "
                         f"({str(e).splitlines()[0][:200]})") from None
    import logging
    logging.getLogger("ray.data").setLevel(logging.ERROR)   # no INFO lines per job
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        count = int(actors) if actors else (gpus or max(1, len(nodes)))
        # without GPUs an actor takes a whole node's CPUs (XLA uses them all), so that the
        # actors spread one per node
        cpus = max(1, int(min(n.get("Resources", {}).get("CPU", 1) for n in nodes)))
        remote = {"num_gpus": 1} if gpus else {"num_cpus": cpus}
        jobs = [{"chunk": json.dumps({"rows": [int(i) for i in idx],
                                      "paths": [paths[i] for i in idx],
                                      "digests": [digests[i] for i in idx]})}
                for idx in chunks]
        ds = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
            ChunkExtractor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=count),
            fn_constructor_kwargs=dict(
                weights=weights, family=family, dtype=dtype, key=key, parts=str(parts),
                max_side=images.max_side(), batch_size=batch_size, bucket=bucket,
                on_error=on_error), **remote)
        manifest = {"model": key, "chunks": len(chunks), "done": [], "skipped": []}
        try:
            for row in ds.iter_rows():
                r = json.loads(str(row["result"]))
                skipped = [(int(i), str(why)) for i, why in r["skipped"]]
                manifest["done"].append({"part": r["part"], "images": len(r["good"])})
                manifest["skipped"] += [paths[i] for i, _ in skipped]
                files.atomic_write_text(Path(parts) / search.RAY_MANIFEST,
                                        json.dumps(manifest, indent=1))
                for _, why in skipped:
                    bar.write(f"skipped: {why}", file=sys.stderr)
                bar.update(len(r["good"]) + len(skipped))
                D = None
                if r["part"]:
                    with np.load(Path(parts) / r["part"], allow_pickle=False) as z:
                        D = z["descriptors"]
                err = None if r["error"] is None else (int(r["error"][0]), str(r["error"][1]))
                yield r["good"], skipped, D, err
                if err is not None:
                    return
        except ScvnetError:
            raise
        except Exception as e:      # noqa: BLE001  an actor's error, as Ray raises it
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines()
            raise InputError(f"--ray {address}: the extraction job failed: "
                             f"{(text[-1] if text else type(cause).__name__)[:300]}") from None
    finally:
        ray.shutdown()
