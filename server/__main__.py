"""``python -m server``: see server.launcher."""

import sys

from server.launcher import main

sys.exit(main())
