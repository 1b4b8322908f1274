"""`python -m imagefs` is the `imagefs` command."""

import sys

from imagefs.cli import main

sys.exit(main())
