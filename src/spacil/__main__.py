from spacil.cli import main

raise SystemExit(main())
