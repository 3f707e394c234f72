"""`python -m deco.pipeline.cli ...` is the `deco` command (how launchers start every rank)."""
import sys

from deco.pipeline.cli.main import main

sys.exit(main())
