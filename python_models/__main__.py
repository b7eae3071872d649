"""``python -m python_models`` = the ``recon`` command."""

import sys

from .cli import main

sys.exit(main())
