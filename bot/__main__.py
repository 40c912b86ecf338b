"""`python -m bot` is the same as the `drawbridge` command."""

from bot.cli import main

raise SystemExit(main())
