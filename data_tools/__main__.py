"""``python -m data_tools COMMAND ...``: see ``data_tools.cli``."""

from data_tools.cli import main

raise SystemExit(main())
