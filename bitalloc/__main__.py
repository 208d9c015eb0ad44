"""``python -m bitalloc`` (and ``torchrun -m bitalloc``): the command line."""

import sys

from .cli import main

sys.exit(main())
