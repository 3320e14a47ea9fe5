"""`scvnet-search serve --watch`: follow the indexed folder as it changes.

A watchdog observer reports files added, changed, moved or removed under the folder; after
a quiet moment (`settle` seconds with no new change, so a copy of many files is one update)
the folder is re-indexed incrementally into the served index file (`search.update_index`:
only new or changed files are extracted, removed ones dropped, the file written whole by an
atomic rename), and the server loads it: each request searches one whole index, the one
before or the one after, never a half-built one (`Searcher.current` swaps the index and its
ids together). A file that cannot be read is skipped and listed, as by `scvnet-search
index`; an update that fails leaves the index in use as it was, and says why.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from scvnet_jax.errors import ScvnetError

log = logging.getLogger("scvnet_jax.app")


class Watcher:
    """Re-indexes `folder` into `index_path` for `searcher` when files under it change.

    update: keyword arguments for `search.update_index` (family, weights, dtype, backend,
    batch_size, bucket, ...). `status()` is what GET /api/health shows under "watch"."""

    def __init__(self, searcher, folder, index_path, *, settle: float = 1.0,
                 report=print, **update):
        from scvnet_jax.images import IMAGE_EXTENSIONS

        self.searcher, self.folder = searcher, Path(folder).resolve()
        self.index_path = Path(index_path).resolve()
        self.settle, self.report, self.update_kwargs = settle, report, update
        self.extensions = IMAGE_EXTENSIONS
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._last_change = 0.0
        self._lock = threading.Lock()
        self._status = {"folder": str(self.folder), "updates": 0, "pending": True,
                        "updating": False, "last": None, "skipped": [], "error": None}
        self._observer = None
        self._thread = None

    # -- watchdog's side: mark a change (cheap; runs on the observer's thread)
    def dispatch(self, event) -> None:
        """A watchdog event: a change that matters when an image file (or a folder, which
        may hold images) was created, modified, moved or deleted; the index's own files
        and other files are not."""
        if event.event_type not in ("created", "modified", "moved", "deleted", "closed"):
            return
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "")
                                    else [])
        for p in map(_text, paths):
            if p.startswith(str(self.index_path)):     # the index, its parts, its temp file
                continue
            if (event.is_directory and event.event_type != "modified") or \
                    Path(p).suffix.lower() in self.extensions:
                self.mark()
                return

    def mark(self) -> None:
        with self._lock:
            self._last_change = time.monotonic()
            self._status["pending"] = True
        self._changed.set()

    # -- the updating thread
    def start(self, initial: bool = True) -> "Watcher":
        """Starts following the folder; with `initial`, first brings the index up to date
        with changes made while no server watched."""
        try:
            from watchdog.observers import Observer
        except ImportError as e:
            raise ScvnetError(f"serve --watch needs watchdog ({e.name} is missing): pip "
                              "install 'scvnet_jax[app]'") from None
        self._observer = Observer()
        self._observer.schedule(self, str(self.folder), recursive=True)
        self._observer.daemon = True
        self._observer.start()
        if initial:
            self.mark()
        else:
            self._status["pending"] = False
        self._thread = threading.Thread(target=self._run, name="scvnet-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            while True:                      # settle: wait until the changes stop
                with self._lock:
                    quiet = time.monotonic() - self._last_change
                if quiet >= self.settle or self._stop.is_set():
                    break
                time.sleep(self.settle - quiet + 0.01)
            if self._stop.is_set():
                return
            with self._lock:
                self._changed.clear()
                self._status["pending"] = False
                self._status["updating"] = True
            self.update()

    def update(self) -> dict | None:
        """Re-indexes now (the updating thread does this after changes); the stats, or None
        when the update failed (the index in use stays, the error is in the status)."""
        from scvnet_jax import search

        try:
            index, stats = search.update_index(self.searcher.model, self.folder,
                                               self.index_path, **self.update_kwargs)
        except (ScvnetError, OSError) as e:
            with self._lock:
                self._status.update(updating=False, error=str(e))
            log.warning("re-indexing %s failed; still searching the index loaded before: "
                        "%s", self.folder, e)
            self.report(f"watch: re-indexing {self.folder} failed ({e}); still searching "
                        "the index loaded before")
            return None
        self.searcher.current()             # load it now (requests would on their own)
        skipped = [[str(p), str(r)] for p, r in index.skipped]
        with self._lock:
            self._status.update(updates=self._status["updates"] + 1, updating=False,
                                error=None, skipped=skipped,
                                last={k: stats[k] for k in ("indexed", "reused", "extracted",
                                                            "removed", "skipped", "seconds")})
        said = "".join(f"\n  skipped: {r if r.startswith(p) else f'{p}: {r}'}"
                       for p, r in skipped)
        self.report(f"watch: re-indexed {self.folder}: {stats['indexed']} images "
                    f"({stats['reused']} reused, {stats['extracted']} extracted, "
                    f"{stats['removed']} removed, {stats['skipped']} skipped) in "
                    f"{stats['seconds']:.1f} s" + said)
        return stats

    def status(self) -> dict:
        with self._lock:
            return {**self._status, "skipped": list(self._status["skipped"])}


def _text(p) -> str:
    return p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else str(p)


__all__ = ["Watcher"]
