"""`python -m minidiff ...` is the same as the `minidiff` command."""

from .cli import main

raise SystemExit(main())
