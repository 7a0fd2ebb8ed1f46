from tempflow.cli import main

raise SystemExit(main())
