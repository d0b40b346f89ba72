"""`python -m services.rules`."""

import sys

from services.rules.service import main

sys.exit(main())
