"""`python -m tinkerbell ...` is the `tinkerbell` command."""

import sys

from tinkerbell.cli import main

sys.exit(main())
