"""The entry points as users call them: --help everywhere, eval.py's flags and config
overrides, config files found by name, and the package working from any directory when
installed from a wheel (not only as an editable checkout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest


@pytest.mark.parametrize("module,flags", [
    ("eval", ("--dataset", "--data_dir", "--weights", "--pipelines", "--topk", "--protocol",
              "--distractors", "--output", "--save_visuals", "--cache_dir", "--bucket",
              "--batch_size", "--config")),
    ("train", ("--config", "--workdir", "--distributed", "resume")),
])
def test_help(module, flags, capsys):
    import importlib
    main = importlib.import_module(f"scvnet_jax.{module}").main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag


def test_eval_flags_and_overrides_set_the_config():
    """Every flag of the old argparse eval.py still sets its config field; --config.*
    overrides reach any field; a flag wins over an override of the same field."""
    from scvnet_jax import cli, eval as ev

    fv = cli.parse(["--config", "eval_minirevisit.py", "--config.cvnet.topk=7",
                    "--config.superglobal.rerank.K=5", "--dataset", "rparis6k", "--data_dir",
                    "D", "--weights", "W", "--pipelines", "cvnet_global, cvnet_rerank",
                    "--protocol", "blind", "--output", "o.json", "--cache_dir", "",
                    "--save_visuals", "V", "--distractors", "d.txt", "--batch_size", "3",
                    "--bucket", "128", "--feature_bucket", "8", "--workers", "2"],
                   ev._define, "eval", "")
    cfg = ev.build_config(fv)
    assert (cfg.dataset, cfg.data_dir, cfg.weights, cfg.output, cfg.cache_dir,
            cfg.save_visuals, cfg.distractors) == ("rparis6k", "D", "W", "o.json", "", "V",
                                                   "d.txt")
    assert cfg.pipelines == ["cvnet_global", "cvnet_rerank"]
    assert (cfg.cvnet.topk, cfg.cvnet.protocol, cfg.superglobal.rerank.K) == (7, "blind", 5)
    assert (cfg.batch_size, cfg.bucket, cfg.feature_bucket, cfg.workers) == (3, 128, 8, 2)
    assert cfg.feature_bucket == 8 and cfg.chunk_size == 64
    fv = cli.parse(["--config.cvnet.topk=7", "--topk", "9"], ev._define, "eval", "")
    assert ev.build_config(fv).cvnet.topk == 9
    demo = ev.build_config(cli.parse(["--dataset", "demo"], ev._define, "eval", ""))
    assert (demo.dataset, demo.bucket) == ("demo", 256)          # configs/eval_demo.py


def test_bad_flags_give_one_error_line(capsys, one_error_line):
    from scvnet_jax import eval as ev, train as tr

    assert ev.main(["--protocol", "sideways"]) == 2
    one_error_line(capsys.readouterr().err, "protocol")
    assert ev.main(["--config", "no_such_config.py"]) == 2
    one_error_line(capsys.readouterr().err, "no_such_config.py")
    assert tr.main(["--config", "demo.py", "--workdir", "w", "stray"]) == 2
    one_error_line(capsys.readouterr().err, "unexpected arguments ['stray']")


@pytest.mark.slow
def test_installed_wheel_works_from_any_directory(tmp_path, demo_tfds, repo):
    """`pip wheel .` ships configs/ as scvnet_jax.configs and the bundled model: with the
    wheel's contents on the path (no checkout), train and eval run from another directory
    and find shipped configs by name."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path / "dist"), str(repo)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("scvnet_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "scvnet_jax/configs/demo.py" in names and "scvnet_jax/train.py" in names
    assert any(n.startswith("scvnet_jax/assets/demo_model/state/") for n in names)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env[k] = os.environ[k]
    r = subprocess.run([sys.executable, "-c", "import scvnet_jax, sys; print(scvnet_jax.__file__)"],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.stdout.startswith(str(site)), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "scvnet_jax.train", "--config", "demo.py:tiny",
                        "--workdir", "w", "--config.total_steps=0", "--noprogress",
                        f"--config.data.data_dir={demo_tfds}"],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (work / "w" / "model" / "config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "scvnet_jax.eval", "--dataset", "demo",
                        "--weights", "w/model", "--pipelines", "cvnet_global"],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cvnet_global (protocol: label-free)" in r.stdout
    assert (work / "results" / "demo" / "results.json").is_file()   # not loose in the cwd
    assert not (work / "results.json").exists()


@pytest.mark.parametrize("module, args", [
    ("eval", ["--dataset", "demo", "--topk", "-5"]),
    ("train", ["--config", "demo.py:tiny", "--workdir", "w", "--config.batch_size=0"]),
])
def test_config_errors_come_before_jax_loads(module, args, tmp_path, repo):
    """The checks run in a fraction of a second: before JAX, Flax or any data is loaded."""
    code = (f"import sys\nfrom scvnet_jax import {module} as m\nrc = m.main({args!r})\n"
            "print(rc, sorted(k for k in ('jax', 'flax', 'tensorflow_datasets') "
            "if k in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.stdout.split("\n")[0] == "2 []", r.stdout + r.stderr
    assert r.stderr.startswith("error: config.") and not (tmp_path / "w").exists()


def test_no_compilation_cache_on_a_nearly_full_disk(tmp_path, monkeypatch, capsys):
    """With less than 1 GiB free the cache stays off for the run, with one note."""
    import collections
    import shutil

    import jax

    from scvnet_jax import cli

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 5 << 20))
    enabled, cache_dir = jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        cli.use_compilation_cache(str(tmp_path / "cache"))
        assert not jax.config.jax_enable_compilation_cache
        err = capsys.readouterr().err
        assert err.startswith("note: ") and "5 MB free; the compilation cache is off" in err
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_compilation_cache_dir", cache_dir)


def test_an_unfinished_cache_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A cache write that fails mid-way (a full disk) leaves a truncated entry without its
    atime file; drop_unfinished_entries removes it (and only it), so the next run compiles
    and writes it rather than warn about a truncated one forever."""
    import errno

    from jax._src import lru_cache     # jax's own cache class, used as jax uses it

    from scvnet_jax.compilation_cache import drop_unfinished_entries

    cache = lru_cache.LRUCache(str(tmp_path / "xla"), max_size=1 << 20)
    cache.put("a", b"x" * 1000)
    path_class = type(cache.path)        # pathlib's, or etils.epath's when installed
    real_write = path_class.write_bytes

    def full(self, data):
        real_write(self, data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(path_class, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        cache.put("b", b"y" * 1000)
    monkeypatch.undo()
    assert drop_unfinished_entries(tmp_path / "xla") == ["b"]
    assert sorted(p.name for p in (tmp_path / "xla").iterdir()
                  if not p.name.startswith(".lock")) == ["a-atime", "a-cache"]
    cache.put("b", b"y" * 1000)
    assert cache.get("b") == b"y" * 1000 and cache.get("a") == b"x" * 1000


_CACHE_CHILD = r"""
import json, sys, warnings
warnings.simplefilter("always")
from scvnet_jax.compilation_cache import use_compilation_cache
use_compilation_cache(sys.argv[1])
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
with warnings.catch_warnings(record=True) as caught:
    jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"hits": len(hits), "warnings": [str(w.message)[:200] for w in caught]}))
"""


def test_a_killed_cache_write_does_not_trouble_later_runs(tmp_path, repo):
    """An entry left truncated by a run killed mid-write (jax writes entries in place) is
    neither read nor kept by the next command-line run: it compiles again, without a
    warning, and writes the entry whole; the run after that finds it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))

    def child():
        r = subprocess.run([sys.executable, "-c", _CACHE_CHILD, str(tmp_path)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.splitlines()[-1])

    assert child() == {"hits": 0, "warnings": []}
    xla = tmp_path / "xla"
    entries = {p: p.read_bytes() for p in xla.iterdir() if p.name.endswith("-cache")}
    for p, whole in entries.items():                          # the kill, mid-write
        p.write_bytes(whole[:len(whole) // 2])
        p.with_name(p.name.replace("-cache", "-atime")).unlink(missing_ok=True)
    assert child() == {"hits": 0, "warnings": []}
    assert all(len(p.read_bytes()) > len(whole) // 2 for p, whole in entries.items())
    assert child() == {"hits": len(entries), "warnings": []}
