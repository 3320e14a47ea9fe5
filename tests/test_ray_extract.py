"""index --ray: extraction as a Ray Data job on a local Ray cluster started here (a head and
a worker node on localhost): the one-process path's descriptors, unreadable files skipped
and listed, and a job killed mid-way whose rerun extracts only the rest and ends identical.

Bit for bit with a fixed `--bucket`: with `auto` (the default) the padded shapes a process
picks depend on the shapes it already compiled, so an actor may pad a chunk otherwise than
the one process did and its descriptors differ by float rounding (one float16 ulp seen)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app.cli import main

pytestmark = pytest.mark.slow       # a Ray cluster: ~15 s to start


@pytest.fixture(scope="module")
def ray_cluster(free_port, tmp_path_factory):
    """ray_cluster() -> the address of a Ray cluster of two nodes on localhost (1 CPU and a
    small object store each), checked to have both nodes alive and started again if not
    (a CI run once saw the head's raylet killed seconds after its start, while the other
    worker's tests used most of the machine's memory); stopped after the module."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray puts Unix sockets under its temp dir, and an AF_UNIX path has at most 107 bytes:
    # under pytest's /tmp/pytest-of-root/pytest-NN/popen-gwN/ray0/session_<date>/sockets/
    # the plasma store's socket exceeds it (CI's node starts failed on this). A short one:
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    common = ["--num-cpus", "1", "--object-store-memory", str(200 << 20),
              "--disable-usage-stats"]
    state = {}

    def alive(address) -> int:
        probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))" % address)
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env=env, timeout=120)
        return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else 0

    def ports() -> list:
        """Every port of a node chosen free (Ray's fixed defaults, e.g. the dashboard
        agent's 52365, would collide between two nodes on one machine)."""
        return [arg for flag in ("--node-manager-port", "--object-manager-port",
                                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                 "--metrics-export-port", "--runtime-env-agent-port")
                for arg in (flag, str(free_port()))]

    def start() -> str:
        if state.get("started"):            # a node died: everything of it goes first
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        state["started"] = True
        port = free_port()
        for cmd in ([ray_bin, "start", "--head", "--port", str(port), "--include-dashboard",
                     "false", "--ray-client-server-port", str(free_port()), "--temp-dir",
                     str(temp), *common, *ports()],
                    [ray_bin, "start", "--address", f"127.0.0.1:{port}", *common, *ports()]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            state["log"] = r.stdout[-2000:] + r.stderr[-2000:]
            if r.returncode:
                return ""
        return f"127.0.0.1:{port}"

    def ensure() -> str:
        for _ in range(3):
            if state.get("address") and alive(state["address"]) == 2:
                return state["address"]
            state["address"] = start()
        assert state["address"] and alive(state["address"]) == 2, (
            "a two-node Ray cluster did not stay up: " + state.get("log", ""))
        return state["address"]
    try:
        yield ensure
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_benchmark):
    out = tmp_path_factory.mktemp("photos")
    for p in sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))[:16]:
        shutil.copy(p, out / p.name)
    (out / "broken.jpg").write_bytes(b"not a photo")
    return out


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory, tiny_model_dir):
    """The one-process index of the photos."""
    ref = tmp_path_factory.mktemp("ref") / "ref.index"
    assert main(["index", str(photos), "--index", str(ref), "--weights", str(tiny_model_dir),
                 "--chunk_size", "3", "--bucket", "64"]) == 0
    return sj.search.Index.load(ref)


@pytest.fixture(scope="module")
def demo_reference(photos, tmp_path_factory):
    """The one-process index of the photos with the demo model."""
    ref = tmp_path_factory.mktemp("ref") / "demo.index"
    assert main(["index", str(photos), "--index", str(ref), "--chunk_size", "1",
                 "--bucket", "64"]) == 0
    return sj.search.Index.load(ref)


def test_ray_gives_the_one_process_index(ray_cluster, photos, reference, tiny_model_dir,
                                         tmp_path, capsys):
    index = tmp_path / "ray.index"
    assert main(["index", str(photos), "--index", str(index), "--weights", str(tiny_model_dir),
                 "--chunk_size", "3", "--bucket", "64", "--ray", ray_cluster()]) == 0
    captured = capsys.readouterr()
    assert "16 images (0 reused, 16 extracted, 0 removed, 1 skipped)" in captured.out
    assert f"skipped: {photos / 'broken.jpg'}: cannot read the image" in captured.err
    got = sj.search.Index.load(index)
    assert got.paths == reference.paths and got.digests == reference.digests
    assert got.skipped == reference.skipped and len(got.skipped) == 1
    np.testing.assert_array_equal(got.descriptors, reference.descriptors)
    assert not (tmp_path / "ray.index.parts").exists()


def test_a_killed_job_resumes_and_ends_identical(ray_cluster, photos, demo_reference,
                                                 tmp_path, repo):
    """SIGKILL of the driver once two chunks are saved (the demo model, a chunk per photo,
    so that the job lasts seconds); the same command again extracts only the rest."""
    index = tmp_path / "i.index"
    cmd = [sys.executable, "-m", "scvnet_jax.app", "index", str(photos), "--index",
           str(index), "--chunk_size", "1", "--bucket", "64", "--ray", ray_cluster()]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with open(tmp_path / "log", "w") as log:     # not a pipe: Ray's processes may hold it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    parts = tmp_path / "i.index.parts"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("chunk_*.npz"))) < 2:
        assert proc.poll() is None, (tmp_path / "log").read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not index.exists()
    time.sleep(2)               # the job's actors go with their driver
    done = sum(len(np.load(p)["digests"]) for p in parts.glob("chunk_*.npz"))
    assert 2 <= done < 16, "the kill did not land mid-way"
    if (parts / "ray_manifest.json").exists():  # the chunks the driver heard of so far
        manifest = json.loads((parts / "ray_manifest.json").read_text())
        assert manifest["chunks"] == 17                        # 16 photos + the broken one
        assert {d["part"] for d in manifest["done"] if d["part"]} <= {
            p.name for p in parts.glob("chunk_*.npz")}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"({done} reused, {16 - done} extracted, 0 removed, 1 skipped)" in again.stdout
    got = sj.search.Index.load(index)
    assert got.paths == demo_reference.paths and got.digests == demo_reference.digests
    np.testing.assert_array_equal(got.descriptors, demo_reference.descriptors)
    assert not parts.exists()


def test_bad_ray_input_is_one_line(photos, tmp_path, capsys, free_port):
    for argv, message in (
            (["--ray", f"127.0.0.1:{free_port()}"], "cannot connect to the Ray cluster"),
            (["--ray", "localhost:notaport"], "cannot connect to the Ray cluster"),
            (["--ray", "auto", "--distributed"], "--ray and --distributed: extraction runs "
                                                 "on one of them, not both"),
            (["--ray", "auto", "--ray_actors", "0"], "argument --ray_actors")):
        try:
            code = main(["index", str(photos), "--index", str(tmp_path / "x.index"), *argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("error:") == 1, err
        assert not (tmp_path / "x.index").exists()


def test_ray_needs_a_weights_path(photos, tmp_path, tiny_model_dir):
    """The actors load the model themselves: from the Python API, weights= is required,
    before any file is read."""
    model = sj.load(tiny_model_dir)
    with pytest.raises(sj.ScvnetError, match="ray: the actors load the model from its "
                                             "weights; give weights="):
        sj.search.update_index(model, photos, tmp_path / "x.index", ray="auto")
    assert not (tmp_path / "x.index").exists()
