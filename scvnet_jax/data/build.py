"""Build a training set as TFDS ArrayRecord (a module of its own: TFDS builders must not be
defined in `__main__`).

    python -m scvnet_jax.data.build demo --data_dir ~/tensorflow_datasets
    python -m scvnet_jax.data.build gldv2_clean --data_dir D --manual_dir GLDV2
"""
from __future__ import annotations

import argparse
import sys

from scvnet_jax.data import builders
from scvnet_jax.errors import ScvnetError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scvnet_jax.data.build",
                                description="Build a training set as TFDS ArrayRecord.")
    p.add_argument("name", choices=["demo", "gldv2_clean"])
    p.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
    p.add_argument("--manual_dir", help="gldv2_clean: folder with train_clean.csv and train/")
    args = p.parse_args(argv)
    try:
        b = builders.prepare(args.name, args.data_dir, args.manual_dir)
    except ScvnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{b.info.full_name}: {b.info.splits['train'].num_examples} images, "
          f"{b.info.metadata['num_classes']} classes in {b.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
