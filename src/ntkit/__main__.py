from ntkit.cli import main

raise SystemExit(main())
