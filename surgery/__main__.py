"""``python -m surgery``: the ``surgery`` command line."""
from .app.cli import main

raise SystemExit(main())
