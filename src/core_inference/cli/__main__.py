"""``python -m core_inference.cli``: the same as ``core-inference``."""

from . import main

raise SystemExit(main())
