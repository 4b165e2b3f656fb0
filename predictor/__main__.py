"""`python -m moe_reuse.predictor ...`: the predictor subcommands without the plugin's entry point."""

import sys

from .cli import main

sys.exit(main())
