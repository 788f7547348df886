"""`python -m csm`: the `csm` command."""

import sys

from .cli import main

sys.exit(main())
