"""`python -m bench`: see bench/runner.py (or `bench/run --help`)."""

import sys

from bench.runner import main

sys.exit(main())
