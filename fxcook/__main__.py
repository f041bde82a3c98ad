"""`python -m fxcook`: the same command as `fxcook`."""
import sys

from .cli import main

sys.exit(main())
