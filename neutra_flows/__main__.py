"""``python -m neutra_flows``: the same as the ``neutra-flows`` command."""

import sys

from neutra_flows.app.cli import main

sys.exit(main())
