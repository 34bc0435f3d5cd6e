"""``python -m ditvla.cli`` (what ``torchrun ... -m ditvla.cli train`` runs)."""

import sys

from ditvla.cli import main

sys.exit(main())
