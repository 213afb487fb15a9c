"""`python -m mgbench ...`: the same as the `mgbench` command."""
import sys

from mgbench.cli import main

sys.exit(main())
