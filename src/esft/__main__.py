from esft.cli import main

raise SystemExit(main())
