"""Shared fixtures and helpers (tests never import each other; what they share is here).

The ground truth lives in `../shared` next to the repository (override with
SCVNET_SHARED). It is required: parity tests fail, never skip, when it is missing.
Official-format checkpoints are written once per session by the fixture's own
`make_checkpoint.py` (which needs torch, a test-only dependency).

Speed: one persistent XLA compilation cache serves the whole session, subprocesses
included (JAX_COMPILATION_CACHE_DIR; default `.pytest_cache/xla` in the checkout, kept
between sessions; the cache key includes the program, the jax version and the flags, so a
stale entry is never used). Properties that do not depend on the network's width are
proven on `tiny_model_dir`, a width-8 ResNet-50 CVNet.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCVNET_SHARED", REPO.parent / "shared")).resolve()
PARITY = SHARED / "parity"
MINIREVISIT = SHARED / "minirevisit"
RERANKERS = SHARED / "rerankers"
TINY_ARCH = dict(depth=50, width=8, reduction_dim=32, corr_dim=16)


def pytest_configure(config):
    cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                  str(REPO / ".pytest_cache" / "xla"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # a size limit, as the command lines set: jax then marks each finished entry (its atime
    # file), and their start drops the unmarked ones (scvnet_jax/compilation_cache.py)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    Path(cache).mkdir(parents=True, exist_ok=True)


def _reproduce_selected(config) -> bool:
    """The `reproduce` tier runs only when the -m expression names it (`-m reproduce`)."""
    return "reproduce" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config, items):
    """Tests marked `reproduce` (full retrains of shipped configs that reproduce their
    published numbers) are left out unless `-m` names them: the default run (CI) and
    `-m "not slow"` never run them; `pytest -m reproduce` runs them alone.

    The longest files first (xdist hands out whole files, in this order, with
    --no-loadscope-reorder), so that on two workers the long runs start at once and the
    quick tests fill the gaps, instead of a long run starting last. Then the files with
    slow tests, the notebooks, then the rest; the order within a file is kept."""
    # (xdist starts each worker with two files: the third is a quick one, so the worker of
    # the longest file takes no other long file before it is done)
    # (the full demo retrains are the `reproduce` tier, left out of this run)
    first = ("evaluation/test_pipelines.py", "test_metrics.py", "e2e/test_own_photos.py",
             "e2e/test_demo_eval.py", "e2e/test_demo_train.py")
    # the quickstart notebook's own-photos cell compiles what test_own_photos.py compiled
    # (the same tiny runs on the same photos): well after it (after the other slow files),
    # from the compilation cache
    after_slow = ("e2e/test_notebooks.py",)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        path = item.path.as_posix()
        for i, name in enumerate(first):
            if path.endswith("/tests/" + name):
                return i
        if any(path.endswith("/tests/" + name) for name in after_slow):
            return len(first) + 1
        return len(first) if item.path in slow_files else len(first) + 2

    items.sort(key=rank)
    if not _reproduce_selected(config):
        left_out = [item for item in items if item.get_closest_marker("reproduce")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not item.get_closest_marker("reproduce")]


_FILE_SECONDS: dict = {}     # (xdist worker, test file) -> seconds, on the controller


def pytest_runtest_logreport(report):
    """Adds each test's set-up, call and tear-down time to its file and worker."""
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", "main")
    key = (worker, report.nodeid.split("::")[0])
    _FILE_SECONDS[key] = _FILE_SECONDS.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Per worker: its busy time and its longest files, the data for the file order of
    `pytest_collection_modifyitems` (the suite's wall time is the busiest worker's)."""
    if len({w for w, _ in _FILE_SECONDS}) < 2:
        return
    tr = terminalreporter
    tr.section("time per worker (longest files)")
    for worker in sorted({w for w, _ in _FILE_SECONDS}):
        files = sorted(((s, f) for (w, f), s in _FILE_SECONDS.items() if w == worker),
                       reverse=True)
        tr.write_line(f"{worker}: {sum(s for s, _ in files):.0f} s in {len(files)} files; "
                      + ", ".join(f"{f.removeprefix('tests/')} {s:.0f}" for s, f in files[:8]))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"ground truth not found: {path}. The tests need ../shared beside the "
                    "repository (or SCVNET_SHARED pointing to it).", pytrace=False)
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    """The checkout's root."""
    return REPO


@pytest.fixture(autouse=True)
def _working_size_restored():
    """Commands run in-process set the images' working size (eval.py: full size for the
    official benchmarks; query and serve: the index's): each test starts where the last
    began, whatever ran before it."""
    from scvnet_jax import images
    start = images.max_side()
    yield
    images.set_max_side(start)


# -- ground truth ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared():
    """Paths of the ground truth: .parity, .minirevisit (checked to exist)."""
    class Shared:
        parity = _require(PARITY)
        minirevisit = _require(MINIREVISIT)
    return Shared


@pytest.fixture(scope="session")
def parity_fixture():
    """parity_fixture(depth) -> {key: array} of ../shared/parity/cvnet_r{depth}_seed0.npz."""
    made: dict = {}

    def get(depth: int) -> dict:
        if depth not in made:
            with np.load(_require(PARITY / f"cvnet_r{depth}_seed0.npz")) as z:
                made[depth] = {k: z[k] for k in z.files}
        return made[depth]

    return get


@pytest.fixture(scope="session")
def rerankers_fixture():
    """rerankers_fixture(method, seed=0) -> {key: array} of
    ../shared/rerankers/<method>_seed<seed>.npz (ICFRR, CSA, AMES official outputs)."""
    made: dict = {}

    def get(method: str, seed: int = 0) -> dict:
        if (method, seed) not in made:
            with np.load(_require(RERANKERS / f"{method}_seed{seed}.npz")) as z:
                made[(method, seed)] = {k: z[k] for k in z.files}
        return made[(method, seed)]

    return get


@pytest.fixture(scope="session")
def parity_state_dict():
    """parity_state_dict(depth, seed=0) -> the exact NumPy state dict behind a fixture
    (../shared/parity/weights.py)."""
    def get(depth: int, seed: int = 0) -> dict:
        sys.path.insert(0, str(_require(PARITY)))
        try:
            import weights  # noqa: the fixture's own module
        finally:
            sys.path.pop(0)
        return weights.make_state_dict(weights.load_spec(PARITY / f"cvnet_r{depth}_keys.json"),
                                       seed)
    return get


@pytest.fixture(scope="session")
def gnd_from_fixture():
    return lambda fx: json.loads(str(fx["map_gnd"]))


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """official_checkpoint(depth, legacy=False) -> path of a `.pyth` written by
    ../shared/parity/make_checkpoint.py (seed 0), made once per session."""
    out_dir = tmp_path_factory.mktemp("official")
    made: dict = {}

    def get(depth: int, legacy: bool = False) -> Path:
        key = (depth, legacy)
        if key not in made:
            out = out_dir / f"r{depth}_seed0{'_legacy' if legacy else ''}.pyth"
            cmd = [sys.executable, str(_require(PARITY / "make_checkpoint.py")),
                   str(PARITY / f"cvnet_r{depth}_keys.json"), "0", str(out)]
            subprocess.run(cmd + (["--legacy"] if legacy else []), check=True)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def torch_save():
    """torch_save(obj, path, legacy=False) -> path: `torch.save` of `obj` with every NumPy
    array as a tensor (zip format, or the pre-1.6 one): an official-format checkpoint.
    torch is a test-only dependency; the package never imports it."""
    def save(obj, path, legacy=False):
        import torch

        def to_torch(x):
            if isinstance(x, dict):
                return {k: to_torch(v) for k, v in x.items()}
            return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x
        torch.save(to_torch(obj), path, _use_new_zipfile_serialization=not legacy)
        return path
    return save


@pytest.fixture(scope="session")
def converted_dir(official_checkpoint, tmp_path_factory):
    """converted_dir(depth) -> model directory converted from official_checkpoint(depth)."""
    from scvnet_jax.convert import convert

    made: dict = {}

    def get(depth: int) -> Path:
        if depth not in made:
            out = tmp_path_factory.mktemp("converted") / f"cvnet_r{depth}"
            made[depth] = convert(official_checkpoint(depth), out)
        return made[depth]

    return get


def random_variables(arch, seed: int = 0) -> dict:
    """Random CVNet variables drawn with NumPy (no XLA program to compile, unlike Flax's
    jitted init, which takes ~45 s on 2 cores): kernels N(0, 1/fan_in), small biases,
    BatchNorm/GroupNorm scales near 1, positive running variances, GeM p = 3."""
    import jax
    from scvnet_jax.models.cvnet import abstract_variables

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
        if name == "p":
            return np.full(shape, 3.0, np.float32)
        if name in ("scale", "var"):
            return (1 + 0.1 * np.abs(rng.normal(size=shape))).astype(np.float32)
        return (0.05 * rng.normal(size=shape)).astype(np.float32)   # bias, mean

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(arch))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A model directory of a random width-8 ResNet-50 CVNet (`random_variables`, seed 0)."""
    from scvnet_jax.convert import save_model_dir
    from scvnet_jax.models import Arch

    arch = Arch(**TINY_ARCH)
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model", arch,
                          random_variables(arch))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import scvnet_jax as sj
    return sj.load(tiny_model_dir)


@pytest.fixture(scope="session")
def demo_benchmark(tmp_path_factory):
    """The demo benchmark (revisitop layout), built once: its data_dir."""
    from scvnet_jax.data import demo
    out = tmp_path_factory.mktemp("demo_bench")
    demo.build_benchmark(out)
    return out


@pytest.fixture(scope="session")
def demo_tfds(tmp_path_factory):
    """A TFDS data_dir holding the demo training set, built once."""
    from scvnet_jax.data import builders
    out = tmp_path_factory.mktemp("tfds")
    builders.prepare("demo", out)
    return out


# -- running the entry points -----------------------------------------------------------------

def _default_sigint():
    """In the child: Ctrl-C's default disposition, as from a terminal, even when the test
    run itself was started as a background job (which ignores SIGINT, and the training
    loop then rightly leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def run_module():
    """run_module(name, *args, env=None, cwd=None, wait=True, timeout=1800): runs
    `python -m scvnet_jax.<name> args` in a subprocess (the session's compilation cache is
    in the environment); returns CompletedProcess (stdout/stderr as text), or the Popen
    when wait=False."""
    def run(name, *args, env=None, cwd=None, wait=True, timeout=1800):
        cmd = [sys.executable, "-m", f"scvnet_jax.{name}", *map(str, args)]
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONPATH", str(REPO))   # this checkout, however installed
        if not wait:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=cwd or REPO, env=full_env,
                                    preexec_fn=_default_sigint)
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO,
                              env=full_env, timeout=timeout, preexec_fn=_default_sigint)
    return run


@pytest.fixture(scope="session")
def run_train(run_module):
    """run_train(workdir, *overrides, data_dir, config="demo.py", wait=True): train.py on a
    shipped config (e.g. "demo.py:tiny") with --noprogress."""
    def run(workdir, *overrides, data_dir, config="demo.py", wait=True, timeout=1800,
            env=None):
        return run_module("train", "--config", config, "--workdir", workdir, "--noprogress",
                          f"--config.data.data_dir={data_dir}", *overrides, wait=wait,
                          timeout=timeout, env=env)
    return run


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """One folder that every xdist worker shares, as XDG_CACHE_HOME of the demo runs: the
    demo benchmark is built once and descriptors (keyed by the backbone and the images'
    content) are reused by every run of a model that shares one. The cache's writes are
    atomic, so concurrent runs are safe."""
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo_home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture(scope="session")
def demo_eval(run_module, demo_home):
    """demo_eval(*args, output=name) -> (CompletedProcess, results path):
    `python -m scvnet_jax.eval --dataset demo args`, run from another directory, with the
    shared `demo_home` cache."""
    def run(*args, output="results.json"):
        r = run_module("eval", "--dataset", "demo", *args, "--output", demo_home / output,
                       env={"XDG_CACHE_HOME": str(demo_home / "cache")}, cwd=demo_home)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r, demo_home / output

    return run


@pytest.fixture(scope="session")
def medium_map():
    """medium_map(results_json, pipeline, setting="M") -> the pipeline's mAP in that file."""
    return lambda path, pipeline, setting="M": json.loads(Path(path).read_text())[pipeline][
        "mAP"][setting]


@pytest.fixture(scope="session")
def eval_main():
    """eval_main(*args) -> exit status of `python -m scvnet_jax.eval args`, in-process."""
    from scvnet_jax.eval import main
    return lambda *args: main([str(a) for a in args])


@pytest.fixture(scope="session")
def one_error_line():
    """one_error_line(stderr, *texts): stderr has exactly one `error:` line, holding each
    text, and no traceback; returns that line."""
    def check(stderr: str, *texts) -> str:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        for t in texts:
            assert t in errors[0], (t, errors[0])
        return errors[0]
    return check


# -- training mechanics ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def kill_at_checkpoint():
    """kill_at_checkpoint(proc, path): SIGKILLs a training process as soon as `path` (a
    checkpoint directory, or any file the run writes) appears."""
    def kill(proc, ckpt: Path) -> None:
        deadline = time.time() + 900
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return kill


@pytest.fixture(scope="session")
def restore_checkpoint():
    """restore_checkpoint(workdir, step) -> the raw train state saved at `step`, every leaf
    a NumPy array (whatever devices and processes saved it)."""
    def restore(workdir, step):
        import jax
        import orbax.checkpoint as ocp

        path = Path(workdir) / "checkpoints" / str(step) / "state"
        ckptr = ocp.PyTreeCheckpointer()
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return restore


@pytest.fixture(scope="session")
def assert_same_checkpoint(restore_checkpoint):
    """assert_same_checkpoint(workdir_a, workdir_b, step): every leaf of the two runs' train
    states at `step` is bit-identical."""
    def check(a_dir, b_dir, step: int) -> None:
        import jax
        a, b = restore_checkpoint(a_dir, step), restore_checkpoint(b_dir, step)
        for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                          err_msg=jax.tree_util.keystr(p))
    return check


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port on localhost that nothing listens on (for jax.distributed)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]
    return pick


@pytest.fixture(scope="session")
def fake_devices_env():
    """Environment for a subprocess with `n` fake CPU devices: fake_devices_env(n)."""
    def env(n: int) -> dict:
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                "JAX_PLATFORMS": "cpu"}
    return env
