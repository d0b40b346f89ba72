"""`python -m services.scraper`."""

import sys

from services.scraper.service import main

sys.exit(main())
