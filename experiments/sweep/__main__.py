"""`python -m experiments.sweep ...` (see experiments/sweep/cli.py)."""

import sys

from experiments.sweep.cli import main

sys.exit(main())
