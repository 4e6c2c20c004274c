"""`python -m dissect`: the same as the `dissect` command."""

import sys

from dissect.cli import main

sys.exit(main())
