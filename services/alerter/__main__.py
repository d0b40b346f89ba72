"""`python -m services.alerter`."""

import sys

from services.alerter.service import main

sys.exit(main())
