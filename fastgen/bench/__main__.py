"""``python -m fastgen.bench`` / ``fastgen-bench``: run the benchmarks (see :mod:`fastgen.bench.harness`)."""

import sys

from fastgen.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
