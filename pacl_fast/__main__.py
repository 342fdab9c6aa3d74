"""``python -m pacl_fast``: the same as ``pacl-fast``."""

from pacl_fast.cli import console

console()
