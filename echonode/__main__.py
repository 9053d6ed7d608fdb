"""``python -m echonode``."""

import sys

from echonode.commands.main import main

sys.exit(main())
