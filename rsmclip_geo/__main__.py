"""`python -m rsmclip_geo` runs the command line."""

import sys

from rsmclip_geo.cli import main

sys.exit(main())
