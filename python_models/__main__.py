"""``python -m python_models`` = the ``recon`` command."""

import sys

from .runs.cli import main

sys.exit(main())
