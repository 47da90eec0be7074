"""``python -m pdjax ...``: the same command line as ``pdjax ...``."""

import sys

from pdjax.cli import main

if __name__ == "__main__":  # importing this module (docs, tools that walk the package) runs nothing
    sys.exit(main())
