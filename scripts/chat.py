"""Thin entry point: see lvlm_cl/chat.py (python scripts/chat.py --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm_cl.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
