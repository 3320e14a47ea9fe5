"""`python eval.py ...` in a checkout = `python -m scvnet_jax.eval ...` (see its --help)."""
import sys

from scvnet_jax.eval import main

if __name__ == "__main__":
    sys.exit(main())
