"""Build a data set (a module of its own: TFDS builders must not be defined in `__main__`).

    python -m scvnet_jax.data.build demo --data_dir ~/tensorflow_datasets
    python -m scvnet_jax.data.build gldv2_clean --data_dir D --manual_dir GLDV2
    python -m scvnet_jax.data.build folder --manual_dir PHOTOS/ --name my_set --data_dir D
    python -m scvnet_jax.data.build folder --csv labels.csv --name my_set --data_dir D
    python -m scvnet_jax.data.build gldv2_retrieval --data_dir D --manual_dir GLDV2
    python -m scvnet_jax.data.build demo_folder --out PHOTOS/    # the demo photos, as a folder

demo, gldv2_clean: training sets (TFDS ArrayRecord). folder: your own photos, one subfolder
per class (or a path,label CSV) -> a training set with a held-out split that
`eval.py --dataset folder:D/my_set` evaluates on (see scvnet_jax/data/folder.py).
gldv2_retrieval: checks the GLDv2 retrieval benchmark's manual download and writes its
ground truth for `eval.py --dataset gldv2_retrieval --data_dir D`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from scvnet_jax.errors import ScvnetError, first_few

KINDS = ("demo", "gldv2_clean", "folder", "gldv2_retrieval", "demo_folder")


class _Parser(argparse.ArgumentParser):
    def error(self, message):       # one line, exit 2, like every other bad input
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m scvnet_jax.data.build", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS, help="what to build")
    p.add_argument("--data_dir", help="the data folder to write into (TFDS data_dir)")
    p.add_argument("--manual_dir", help="gldv2_*: the GLDv2 download; folder: the photos, "
                   "one subfolder per class")
    p.add_argument("--csv", help="folder: a CSV of path,label rows instead of --manual_dir "
                   "(paths relative to the CSV's folder)")
    p.add_argument("--name", help="folder: the set's name (snake_case), for "
                   "--config.data.name and eval.py --dataset folder:<data_dir>/<name>")
    p.add_argument("--eval_fraction", type=float, default=0.2, help="folder: the part held "
                   "out for evaluation (default 0.2; 0: none)")
    p.add_argument("--holdout", choices=("classes", "images"), default="classes",
                   help="folder: hold out whole classes (default; unseen classes, as the "
                   "landmark benchmarks) or some images of every class")
    p.add_argument("--seed", type=int, default=0, help="folder: seed of the split (default 0)")
    p.add_argument("--skip_small_classes", action="store_true", help="folder: leave out "
                   "classes with a single image instead of stopping")
    p.add_argument("--workers", type=int, default=8, help="threads reading and checking "
                   "images (default 8)")
    p.add_argument("--out", help="demo_folder: the folder to write the demo photos into")
    p.add_argument("--classes", type=int, default=0, help="demo_folder: how many classes "
                   "(default 0: all 72)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    need = {"demo": ["data_dir"], "gldv2_clean": ["data_dir", "manual_dir"],
            "folder": ["data_dir", "name"], "gldv2_retrieval": ["data_dir", "manual_dir"],
            "demo_folder": ["out"]}[args.kind]
    missing = [f"--{n}" for n in need if not getattr(args, n)]
    if missing:
        p.error(f"{args.kind} needs {' and '.join(missing)}")
    try:
        return _run(args)
    except ScvnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; nothing was written (run the same command again)", file=sys.stderr)
        return 130


def next_commands(name: str, data_dir: str, evaluate: bool) -> list[str]:
    """What to run after building the folder set `name`, as it runs from the same folder
    (the package's commands, not a checkout's train.py): train it into runs/<name>, then
    evaluate that run's model on the held-out split."""
    work = f"runs/{name}"
    lines = [f"  train: python -m scvnet_jax.train --config demo.py --workdir {work} "
             f"--config.data.name={name} --config.data.data_dir={shlex.quote(data_dir)}"]
    if evaluate:
        spec = shlex.quote(f"folder:{data_dir.rstrip('/')}/{name}")
        lines.append(f"  evaluate: python -m scvnet_jax.eval --dataset {spec} --weights "
                     f"{work}/model")
    return lines


def _run(args) -> int:
    if args.kind == "folder":
        from scvnet_jax.data import folder

        meta = folder.build(args.name, args.data_dir, args.manual_dir, args.csv,
                            args.eval_fraction, args.holdout, args.seed,
                            args.skip_small_classes, args.workers)
        for note in meta["notes"]:
            print(note)
        off, eoff = meta["class_offsets"], meta.get("eval_class_offsets") or [0]
        print(f"{args.name}: {'already built, unchanged' if meta['reused'] else 'built'} in "
              f"{args.data_dir}: train {off[-1]} images of {len(off) - 1} classes; eval "
              f"({meta['holdout']} held out, {meta['eval_fraction']:g}, seed {meta['seed']}) "
              f"{eoff[-1]} images of {len(eoff) - 1} classes")
        for line in next_commands(args.name, args.data_dir, bool(eoff[-1])):
            print(line)
        return 0
    if args.kind == "gldv2_retrieval":
        from scvnet_jax.data import gldv2_retrieval

        path = gldv2_retrieval.prepare(args.manual_dir, args.data_dir)
        ds = gldv2_retrieval.load(args.data_dir)
        print(f"wrote {path}: {ds.n_queries} queries, {ds.n_db} index images")
        print(f"  evaluate: python -m scvnet_jax.eval --dataset gldv2_retrieval --data_dir "
              f"{shlex.quote(args.data_dir)} --weights MODEL (a model directory or an official "
              "checkpoint)")
        return 0
    if args.kind == "demo_folder":
        from scvnet_jax.data import demo

        n = demo.write_class_folders(args.out, args.classes or None)
        print(f"wrote {n} images of the demo training set into "
              f"{Path(args.out) / '<class>'}/")
        return 0
    from scvnet_jax.data import builders

    b = builders.prepare(args.kind, args.data_dir, args.manual_dir)
    meta = b.info.metadata
    print(f"{b.info.full_name}: {b.info.splits['train'].num_examples} images, "
          f"{meta['num_classes']} classes in {b.data_dir}")
    small, dups = meta.get("small_classes") or {}, meta.get("duplicates") or {}
    if small.get("count"):
        print(f"  note: {small['count']} class(es) with a single image (landmark ids "
              f"{first_few(small['first'])}); training uses the image as its own positive")
    if dups.get("count"):
        print(f"  note: {dups['count']} file(s) with the same content as another: "
              f"{first_few(' = '.join(d) for d in dups['first'])} (kept, as published)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
