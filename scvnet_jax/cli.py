"""What the command-line entry points share: absl flags with an ml_collections config
(`--config FILE[:variant]`, `--config.a.b=value`), `--help`, and one `error:` line (exit
status 2, or the error's own) instead of a traceback for every user-facing error.

Flags are parsed into a fresh `FlagValues` per call, so `main(argv)` can be called again
in one process (the tests do) without flags leaking between calls.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from absl import flags
from ml_collections import config_flags

from scvnet_jax import compilation_cache
from scvnet_jax.errors import ConfigError, ScvnetError

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
# the entry points turn the persistent compilation cache on (the library never does)
use_compilation_cache = compilation_cache.use_compilation_cache


def packaged_config(name: str) -> str:
    """Path of a config file shipped with the package (`configs/<name>`)."""
    import importlib.util
    return str(Path(importlib.util.find_spec("scvnet_jax.configs").origin).with_name(name))


def resolve_config(argv: list[str]) -> list[str]:
    """`--config NAME[:variant]` naming a config shipped with the package (and no file of
    that name here) -> its packaged path, so the entry points work from any directory."""
    out = list(argv)
    for i, a in enumerate(out):
        for prefix in ("--config=", "-config="):
            if a.startswith(prefix):
                out[i] = prefix + _shipped(a[len(prefix):])
        if a in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = _shipped(out[i + 1])
    return out


def _shipped(value: str) -> str:
    name, sep, variant = value.partition(":")
    if "/" in name or Path(name).exists():
        return value
    path = Path(packaged_config(name))
    return str(path) + sep + variant if path.is_file() else value


def define_config(fv: flags.FlagValues, argv: list[str], default: str | None, help: str):
    try:      # a default config is loaded (with the --config.* overrides) right here
        return config_flags.DEFINE_config_file("config", default, help, flag_values=fv,
                                               lock_config=True, sys_argv=argv)
    except (KeyError, AttributeError) as e:
        raise ScvnetError(_unknown_field(argv, e, default)) from None


def parse(argv: list[str], define: Callable[[flags.FlagValues, list[str]], None], prog: str,
          doc: str) -> flags.FlagValues | int:
    """Parsed flags, or an exit status after printing help (0) or one error line (2)."""
    argv = [prog] + resolve_config(argv)
    fv = flags.FlagValues()
    if any(a in HELP_FLAGS for a in argv[1:]):
        define(fv, [prog])
        print(doc.rstrip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        define(fv, argv)
        rest = fv(argv, known_only=False)
        if "config" in fv and fv["config"].value is not None:
            fv["config"].value.keys()     # config_flags defers load errors to first use
    except ScvnetError as e:
        return error(e)
    except OSError as e:       # the config file: the last line says what went wrong
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return error(ScvnetError(f"--config: cannot load the config file ({lines[-1]})"))
    except (KeyError, AttributeError) as e:
        return error(ScvnetError(_unknown_field(argv, e, None)))
    except (flags.Error, ValueError, TypeError) as e:
        return error(ScvnetError(_flag_message(e)))
    if len(rest) > 1:
        return error(ScvnetError(f"unexpected arguments {rest[1:]} (every option is a --flag; "
                                 f"see {prog} --help)"))
    return fv


def define_distributed(fv: flags.FlagValues, what: str) -> None:
    """--distributed and the coordinator flags (one process per host)."""
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (one "
                      f"process per host on TPU slices and multi-node GPU clusters; {what})",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "with --distributed: host:port of "
                        "process 0 (default: from the cluster environment)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index",
                         flag_values=fv)


def init_distributed(fv: flags.FlagValues) -> None:
    start_distributed(fv.distributed, fv.coordinator_address, fv.num_processes,
                      fv.process_id)


def start_distributed(distributed: bool, coordinator_address=None, num_processes=None,
                      process_id=None) -> None:
    """jax.distributed.initialize() with --distributed; the coordinator flags without it
    are an error (a run meant for several processes would go on as one)."""
    given = [f"--{name}" for name, v in (("coordinator_address", coordinator_address),
                                         ("num_processes", num_processes),
                                         ("process_id", process_id)) if v is not None]
    if not distributed:
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --distributed (add it, or drop "
                              f"{'them' if len(given) > 1 else 'it'} for a one-process run)")
        return
    import jax
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _flag_message(e: Exception) -> str:
    """One line: the message, or for a multi-line one its first and last lines."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _unknown_field(argv: list[str], e: Exception, default: str | None) -> str:
    """config_flags' KeyError for an override of a field the config does not have, as a
    message naming the flag and the closest fields."""
    import difflib

    from scvnet_jax.config_files import load_config

    names = [a.split("=", 1)[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
    config = [argv[i + 1] if a in ("--config", "-config") else a.split("=", 1)[1]
              for i, a in enumerate(argv) if a in ("--config", "-config")
              or a.startswith(("--config=", "-config="))] or [default]
    try:
        path, _, variant = config[-1].partition(":")
        cfg = load_config(path, *([variant] if variant else []))
        fields = [f"config.{k}" for k in _flat_keys(cfg)]
    except Exception:  # noqa: BLE001  (no config to compare with: say what failed)
        return f"unknown config field {e}"
    bad = [n for n in names if n not in fields and not any(f.startswith(n + ".")
                                                            for f in fields)]
    if not bad:
        return f"unknown config field {e}"
    close = difflib.get_close_matches(bad[0], fields, n=3)
    return (f"--{bad[0]}: no such field in the config"
            + (f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""))


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _flat_keys(v, prefix + k + ".")
    return out


def error(e: ScvnetError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def run(fn: Callable[[], int]) -> int:
    """Calls `fn`, turning ScvnetError into one error line and its exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return fn()
    except ScvnetError as e:
        return error(e)
