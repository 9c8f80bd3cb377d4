"""``python -m lightclip``: the CLI, for launchers that take a module (``torchrun -m lightclip pretrain ...``)."""

import sys

from lightclip.cli import main

sys.exit(main())
