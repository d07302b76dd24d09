"""``python -m bliss``: the ``bliss`` command, for environments whose scripts are not on PATH."""

import sys

from bliss.cli import main

sys.exit(main())
