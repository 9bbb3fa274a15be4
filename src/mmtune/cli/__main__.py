"""`python -m mmtune.cli`: the same as the `mmtune` command."""

import sys

from mmtune.cli import main

sys.exit(main())
