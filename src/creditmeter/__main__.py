from creditmeter.transport.cli import main

raise SystemExit(main())
