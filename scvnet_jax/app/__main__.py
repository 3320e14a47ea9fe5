import sys

from scvnet_jax.app.cli import main

sys.exit(main())
