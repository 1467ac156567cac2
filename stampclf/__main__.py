"""``python -m stampclf``."""

from .cli import main

main()
