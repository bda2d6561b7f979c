"""`python -m experiments.report SWEEP_DIR` (see experiments/report/cli.py)."""

import sys

from experiments.report.cli import main

sys.exit(main())
