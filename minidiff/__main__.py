"""`python -m minidiff ...` is the same as the `minidiff` command."""

from .cli import main

if __name__ == "__main__":  # not when a worker process (--shards processes) imports the parent's main module
    raise SystemExit(main())
