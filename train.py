"""`python train.py ...` in a checkout = `python -m scvnet_jax.train ...` (see its --help)."""
import sys

from scvnet_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
