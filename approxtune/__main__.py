"""``python -m approxtune``: the command line (see :mod:`approxtune.cli`)."""

import sys

from approxtune.cli import main

sys.exit(main())
