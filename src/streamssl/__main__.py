from streamssl.cli import main

raise SystemExit(main())
