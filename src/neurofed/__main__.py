"""``python -m neurofed`` runs the ``neurofed`` command (used by the site launcher)."""

import sys

from neurofed.cli import main

sys.exit(main())
