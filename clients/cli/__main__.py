"""`python -m clients.cli ...` is the `imagesearch` command."""

import sys

from clients.cli import main

sys.exit(main())
