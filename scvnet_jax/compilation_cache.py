"""The persistent XLA compilation cache, turned on only on request: by the command-line
entry points (train.py, eval.py, scvnet-search) and by `sj.enable_compilation_cache()`.
Importing scvnet_jax or loading a model changes no JAX configuration.

Protection against truncated entries, with jax's public options only: jax (0.10) writes an
entry in place, so a kill or a full disk mid-write leaves a truncated `<key>-cache` file
that every later run warns about and none replaces (jax skips a key that exists). With a
size limit (`jax_compilation_cache_max_size`, set here unless JAX_COMPILATION_CACHE_MAX_SIZE
is given) jax writes each entry and then, under its file lock, the entry's `<key>-atime`
file; so an entry without its atime file is one whose write did not finish, and
`drop_unfinished_entries` removes those (under the same lock) before anything is compiled.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Free space below which the cache stays off for a run: it would take the space results
# and checkpoints need.
CACHE_MIN_FREE_BYTES = 1 << 30
# The cache's size limit (least recently used entries go first); setting one is also what
# makes jax mark finished entries (see above).
CACHE_MAX_BYTES = 8 << 30
_CACHE, _ATIME, _LOCK = "-cache", "-atime", ".lockfile"    # jax's names in the folder


def use_compilation_cache(cache_dir: str | None) -> None:
    """Keeps compiled programs in `<cache_dir>/xla` for later runs (JAX_COMPILATION_CACHE_DIR,
    if set, wins; '' or None and no environment variable: no persistent cache). Every
    program is kept, however fast it compiled, so a second process on the same shapes
    compiles nothing (benchmarks/warm_start.py). Call after `init_distributed` and before
    anything is compiled. With less than 1 GiB free where the cache lives it stays off for
    this run (one note on stderr).

    Not for several processes on CPU: jax writes entries from process 0 only, so process 0
    loads a program in milliseconds while the others compile it for tens of seconds, and
    the first cross-process collective (gloo) times out waiting for them (jax 0.10). On
    GPU and TPU hosts the cache is shared as jax intends (a directory all hosts see)."""
    import shutil

    import jax
    if cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
    where = jax.config.jax_compilation_cache_dir
    if not (where and jax.config.jax_enable_compilation_cache):
        return
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < CACHE_MIN_FREE_BYTES:
        jax.config.update("jax_enable_compilation_cache", False)
        print(f"note: {where} has {free / 2**20:.0f} MB free; the compilation cache is off "
              "for this run (it would take the space results and checkpoints need)",
              file=sys.stderr)
        return
    if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ
            and jax.config.jax_compilation_cache_max_size == -1):
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    if jax.config.jax_compilation_cache_max_size != -1 and "://" not in where:
        drop_unfinished_entries(where)


def drop_unfinished_entries(path, timeout: float = 10.0) -> list[str]:
    """Removes the entries of jax's cache folder `path` whose write did not finish (an
    entry without its atime file: see the module's docstring), holding jax's lock on the
    folder so that no write in progress is taken for one. Returns the keys removed; a lock
    that is not free within `timeout` seconds leaves everything as it is."""
    import filelock

    d = Path(path)
    if not d.is_dir():
        return []
    try:
        with filelock.FileLock(d / _LOCK, timeout=timeout):
            names = {p.name for p in d.iterdir() if p.is_file()}
            dropped = [n[:-len(_CACHE)] for n in names
                       if n.endswith(_CACHE) and n[:-len(_CACHE)] + _ATIME not in names]
            for key in dropped:
                (d / f"{key}{_CACHE}").unlink(missing_ok=True)
            for n in names:       # an atime file whose entry was evicted mid-way
                if n.endswith(_ATIME) and n[:-len(_ATIME)] + _CACHE not in names:
                    (d / n).unlink(missing_ok=True)
    except (filelock.Timeout, OSError):
        return []
    return dropped
