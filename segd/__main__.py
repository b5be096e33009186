from segd.cli import main

raise SystemExit(main())
