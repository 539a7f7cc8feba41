"""``python -m core_inference``: the command line."""

from .cli import main

raise SystemExit(main())
