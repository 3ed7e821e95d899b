"""`python -m lmpipe.cli ...`, the same as `lmpipe ...`."""

import sys

from lmpipe.cli.main import main

sys.exit(main())
