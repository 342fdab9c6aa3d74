"""``python -m pacl_fast.serve [options]``: the same as ``pacl-fast serve``."""

from pacl_fast.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
