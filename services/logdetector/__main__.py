"""`python -m services.logdetector`."""

import sys

from services.logdetector.service import main

sys.exit(main())
