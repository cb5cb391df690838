from crosslora.cli import main

raise SystemExit(main())
