"""``python -m hpcfed`` is the ``hpcfed`` command."""

from hpcfed.cli import main

raise SystemExit(main())
