"""``python -m autosteer``: the same as the ``autosteer`` command."""
import sys

from .cli import main

sys.exit(main())
