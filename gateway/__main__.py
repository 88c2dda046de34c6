"""``python -m gateway`` is ``vtc-gateway``."""

import sys

from .cli import main

sys.exit(main())
