"""The demo data (scvnet_jax.data.demo): disjoint photographs, a deterministic benchmark in
the revisitop layout, hash-checked photographs, and a race-free build."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.data import demo
from scvnet_jax.data.revisitop import load_dataset
from scvnet_jax.errors import InputError


def test_demo_train_and_benchmark_photos_are_disjoint():
    demo.check_disjoint()
    train = {p for i in demo.instances(demo.TRAIN_PHOTOS) for p in i.photos}
    bench = {p for i in demo.instances(demo.BENCHMARK_PHOTOS) for p in i.photos}
    assert train and bench and not train & bench
    with pytest.raises(AssertionError, match="motorcycle_left"):
        demo.check_disjoint(["motorcycle_right.png"], ["motorcycle_left.png"])


def test_demo_benchmark_is_deterministic_and_loads(tmp_path):
    a = demo.build_benchmark(tmp_path / "a")
    b = demo.build_benchmark(tmp_path / "b")
    assert (a / "gnd_demo.pkl").read_bytes() == (b / "gnd_demo.pkl").read_bytes()
    for name in sorted(p.name for p in (a / "jpg").iterdir())[::37]:
        assert (a / "jpg" / name).read_bytes() == (b / "jpg" / name).read_bytes()
    ds = load_dataset(tmp_path / "a", "demo")
    n_inst = len(demo.instances(demo.BENCHMARK_PHOTOS))
    assert ds.n_queries == n_inst and ds.n_db == n_inst * 7
    for g in ds.gnd:  # every database image belongs to exactly one query's lists
        assert len(g["easy"]) == 3 and len(g["hard"]) == 3 and len(g["junk"]) == 1
    all_db = np.concatenate([np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in ds.gnd])
    assert sorted(all_db.tolist()) == list(range(ds.n_db))
    # instance_views (benchmarks/context_signal.py draws training-tile views with it) is
    # the benchmark's own recipe: the first instance's views are the files, byte for byte
    photos = demo.read_photos(demo.BENCHMARK_PHOTOS)
    inst = demo.instances(demo.BENCHMARK_PHOTOS)[0]
    views, query = demo.instance_views(photos, inst,
                                       np.random.default_rng(demo.BENCHMARK_SEED))
    assert demo._encode(query) == (a / "jpg" / f"{inst.name}_query.jpg").read_bytes()
    for kind, n in demo.BENCHMARK_KINDS:
        assert len(views[kind]) == n
        for j, im in enumerate(views[kind]):
            assert demo._encode(im) == (a / "jpg" / f"{inst.name}_{kind}{j}.jpg").read_bytes()


def test_demo_photo_hash_is_checked(monkeypatch):
    with pytest.raises(InputError, match="SHA-256"):
        demo.read_photo("astronaut.png",
                        demo.BENCHMARK_PHOTOS["astronaut.png"]._replace(sha="0" * 16))


def test_concurrent_builds_do_not_collide(tmp_path):
    """Two processes building the benchmark into one folder at once both succeed and leave
    one complete copy (each builds in a fresh staging folder)."""
    import subprocess
    import sys
    code = f"from scvnet_jax.data import demo; demo.build_benchmark({str(tmp_path)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert load_dataset(tmp_path, "demo").n_db == len(demo.instances(demo.BENCHMARK_PHOTOS)) * 7
