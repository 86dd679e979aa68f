"""`python -m deepmetric.cli`: the `deepmetric` command (after `import deepmetric`'s imports)."""

import sys

from deepmetric.cli import main

if __name__ == "__main__":
    sys.exit(main())
