"""``python -m training`` is ``python -m training.demo``."""

import sys

from training.demo import main

sys.exit(main())
