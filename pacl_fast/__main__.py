from pacl_fast.cli import main

raise SystemExit(main())
