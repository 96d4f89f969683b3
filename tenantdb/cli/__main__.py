"""``python -m tenantdb.cli``: the same command as ``tenantdb``."""

import sys

from tenantdb.cli.main import main

sys.exit(main())
