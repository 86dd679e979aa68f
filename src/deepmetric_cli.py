"""The entry point of the `deepmetric` console script, outside the `deepmetric` package.

`import deepmetric` imports every module of the library, and keras with them. This module
imports `deepmetric.cli` with `DEEPMETRIC_LAZY_IMPORT=1` (restored afterwards), under which
`import deepmetric` imports its modules only when they are used, so that `deepmetric --help`
and bad arguments are answered without keras, and keras starts on the backend of
--backend once the arguments are valid. See `deepmetric.cli`.
"""

from __future__ import annotations

import os

LAZY_IMPORT = "DEEPMETRIC_LAZY_IMPORT"


def main(argv: list[str] | None = None) -> int:
    """`deepmetric.cli.main(argv)`, with `deepmetric` imported lazily."""
    previous = os.environ.get(LAZY_IMPORT)
    os.environ[LAZY_IMPORT] = "1"
    try:
        from deepmetric.cli import main as run
    finally:
        if previous is None:
            del os.environ[LAZY_IMPORT]
        else:
            os.environ[LAZY_IMPORT] = previous
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
