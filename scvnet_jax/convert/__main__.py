import sys

from scvnet_jax.convert import main

sys.exit(main())
