"""``python -m dask_sparseconv.cli``."""

import sys

from .main import console_main

sys.exit(console_main())
