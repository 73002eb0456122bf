"""``python -m moekit ...`` runs the ``moekit`` command."""

import sys

from .cli.main import main

sys.exit(main())
