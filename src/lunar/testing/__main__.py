"""``python -m lunar.testing --port N [--host H] [--chunks N] [--pacing-ms X]``."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
