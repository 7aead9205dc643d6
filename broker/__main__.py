"""`python -m broker` is `port-broker`.

Must never: do anything but run the command line (broker/cli.py).
"""

import sys

from broker.cli import main

sys.exit(main())
