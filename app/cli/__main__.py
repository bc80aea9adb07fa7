"""``python -m app.cli`` runs the ``skillgraft`` command (used where the console script is not on PATH)."""

from app.cli import main

raise SystemExit(main())
