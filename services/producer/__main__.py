"""`python -m services.producer`."""

import sys

from services.producer.service import main

sys.exit(main())
