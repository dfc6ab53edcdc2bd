"""`python -m engine.plan`: see engine/plan/cli.py."""

import sys

from engine.plan.cli import main

sys.exit(main())
