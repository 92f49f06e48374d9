"""`python -m labctl.testbed.aws moto <state_dir>`: the moto daemon of a state dir (see `daemon.ensure_moto`)."""

import sys
from pathlib import Path

from labctl.testbed.aws.daemon import moto_main

if len(sys.argv) == 3 and sys.argv[1] == "moto":
    moto_main(Path(sys.argv[2]))
else:
    sys.exit("usage: python -m labctl.testbed.aws moto <state_dir>")
