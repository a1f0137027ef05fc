from aefast.cli import main

raise SystemExit(main())
