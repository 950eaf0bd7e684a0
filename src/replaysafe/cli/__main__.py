"""``python -m replaysafe.cli``: the ``replaysafe`` command without its console script."""

import sys

from replaysafe.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
