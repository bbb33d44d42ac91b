"""``python -m lunar.server serve|keys|usage`` (the same as ``lunar serve|keys|usage``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
