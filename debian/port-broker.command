#!/usr/lib/port-broker/bin/python3 -I
# port-broker, run from its own virtualenv in /usr/lib/port-broker: the dependencies as
# locked for this release, none of Debian's python3-* packages, no PYTHON* variable and
# no user site directory (-I).
import sys

from broker.cli import main

sys.exit(main())
