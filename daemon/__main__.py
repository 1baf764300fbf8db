from daemon import cli

raise SystemExit(cli.main())
