"""Shared by the app's tests: a searcher over 15 demo photos, and it served live."""
import shutil
import threading
import time

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app import server


@pytest.fixture(scope="session")
def searcher(tmp_path_factory, demo_benchmark):
    jpg = demo_benchmark / "demo" / "jpg"
    photos = tmp_path_factory.mktemp("photos")
    for subject in ("astronaut", "coffee", "rocket"):
        for p in sorted(jpg.glob(f"{subject}_*"))[:5]:
            shutil.copy(p, photos / p.name)
    model = sj.load(sj.demo_model_path())
    index, _ = sj.search.update_index(model, photos, photos / "photos.index",
                                      weights="demo")
    return server.Searcher(index, model, max_upload_bytes=200_000)



@pytest.fixture(scope="session")
def serve(free_port):
    """serve(searcher, token=None): a context manager serving the app over `searcher` with
    uvicorn on localhost (a thread), giving its base URL."""
    import contextlib

    import uvicorn

    @contextlib.contextmanager
    def served(searcher, token=None):
        port = free_port()
        live = uvicorn.Server(uvicorn.Config(server.create_app(searcher, token),
                                             host="127.0.0.1",
                                             port=port, log_level="warning"))
        thread = threading.Thread(target=live.run, daemon=True)
        thread.start()
        deadline = time.time() + 60
        while not live.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            live.should_exit = True
            thread.join(30)
    return served


@pytest.fixture(scope="session")
def live_server(searcher, serve):
    """The app over `searcher` served by uvicorn on localhost (a thread): its base URL."""
    with serve(searcher) as url:
        yield url


@pytest.fixture(scope="session")
def collection(searcher, demo_benchmark):
    """collection(folder) -> a Searcher over a small collection it writes into `folder`,
    as a user's photos are: two different photos both named x.jpg (in a/ and b/), a TIFF
    (c.tif), and `folder/photos.index`, reloaded when re-indexed (`searcher.model`).
    collection.spare: a demo photo that is not in it."""
    jpg = sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))
    photos = [next(p for p in jpg if p.name.startswith(s))
              for s in ("chelsea", "camera", "coins")]

    def make(folder):
        import cv2

        for sub, photo in zip(("a", "b"), photos):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, folder / sub / "x.jpg")
        cv2.imwrite(str(folder / "c.tif"), cv2.imread(str(photos[2])))
        path = folder / "photos.index"
        index, _ = sj.search.update_index(searcher.model, folder, path, weights="demo")
        return server.Searcher(index, searcher.model, max_upload_bytes=200_000,
                               index_path=path)
    make.spare = [p for p in jpg if p.name.startswith("coffee")][0]
    return make


# -- a reranker registered at run time (tests/app/test_reranker_plugin.py, the browser test) --

TOY = "toy_reverse"


def _reverse(inp, n: int, scale: float):
    from scvnet_jax.rerank import registry
    """The first stage's top n in reverse order, scored n x scale, ..., 1 x scale."""
    n = min(n, inp.ranks.shape[0])
    ranks = np.array(inp.ranks)
    ranks[:n] = ranks[:n][::-1]
    scores = np.repeat((scale * np.arange(n, 0, -1))[:, None], ranks.shape[1], axis=1)
    return registry.Result(ranks, scores)


@pytest.fixture
def toy():
    """The name of a toy reranker registered for the test (unregistered after it)."""
    from scvnet_jax.rerank import registry
    registry.register(registry.Reranker(
        TOY, "the top n reversed (a test's toy)",
        (registry.Option("n", 3, int, "an integer >= 1", lambda v: v >= 1,
                         help="how many to reverse"),
         registry.Option("scale", 1.0, float, "a number > 0", lambda v: v > 0)),
        _reverse, depth="n", every_hit=True, score="n x scale down to 1 x scale"))
    try:
        yield TOY
    finally:
        registry.unregister(TOY)
    assert TOY not in registry.names()
