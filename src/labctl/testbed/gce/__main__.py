from labctl.testbed.gce import main

raise SystemExit(main())
