"""``python -m lightclip.cli``: the same command line as ``lightclip``."""

import sys

from lightclip.cli import main

sys.exit(main())
