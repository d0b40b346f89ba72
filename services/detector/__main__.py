"""`python -m services.detector`."""

import sys

from services.detector.service import main

sys.exit(main())
