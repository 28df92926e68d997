"""``python -m difix3d`` runs the ``difix3d`` command."""

import sys

from difix3d.cli import main

sys.exit(main())
