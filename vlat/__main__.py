"""``python -m vlat ...`` is the ``vlat`` command (and what ``torchrun ... -m vlat train`` starts)."""

import sys

from vlat.cli import main

sys.exit(main())
