"""python -m engine: the demo generation (see engine.cli)."""

import sys

from .cli import main

sys.exit(main())
