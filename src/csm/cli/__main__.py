"""`python -m csm.cli`: the `csm` command."""

import sys

from .main import main

sys.exit(main())
