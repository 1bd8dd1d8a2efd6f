"""`python -m rcar_fast ...` is the `rcar-fast` command."""
from rcar_fast.cli import main

raise SystemExit(main())
