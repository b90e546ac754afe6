from densessl.cli import main

raise SystemExit(main())
