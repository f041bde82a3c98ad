"""`python -m fxcook`: the same command as `fxcook`."""

import sys

from fxcook.cli import main

sys.exit(main())
