"""`python -m labctl.testbed`: serve the emulated Chameleon until Ctrl-C and print an openrc."""

from labctl.testbed.server import main

raise SystemExit(main())
