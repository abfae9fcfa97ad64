"""``python -m dask_sparseconv.cli``."""

import sys

from .main import main

sys.exit(main())
