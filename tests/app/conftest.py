"""Shared by the app's tests: a searcher over 15 demo photos, and it served live."""
import shutil
import threading
import time

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
def live_server(searcher, free_port):
    """The app over `searcher` served by uvicorn on localhost (a thread): its base URL."""
    import uvicorn

    port = free_port()
    live = uvicorn.Server(uvicorn.Config(server.create_app(searcher), host="127.0.0.1",
                                         port=port, log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not live.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    live.should_exit = True
    thread.join(30)
