"""``python -m lvlm_cl.pretrain RECIPE [key=value ...]``: build (once) and cache the pretrained tiny base that
RECIPE's ``model`` section asks for, in one process, and print its folder (``lvlm_cl.pretrained`` says which
recipe and where; ``lvlm_cl.train.pretrained_base`` builds it). A multi-process launch of a recipe on
``builtin:tiny-llava`` needs it built first."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm_cl.config import cache_dir, load_recipe
from lvlm_cl.errors import report, user_errors
from lvlm_cl.train import pretrained_base


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        print(pretrained_base(cfg.model, cache_dir(cfg)))
    except user_errors() as e:
        return report(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
