"""`python -m broker` is `port-broker`."""

import sys

from broker.cli import main

sys.exit(main())
