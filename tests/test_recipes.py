"""Every recipe in recipes/ validates, starts with the command that runs it, and names its own output."""

from pathlib import Path

import pytest
import yaml

from lvlm_cl.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {"seq5.yaml", "pretrain_tiny.yaml", "seq5_multitask.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_recipe(path)
    first = path.read_text().splitlines()[0]
    # Every recipe starts with its command (a launch config may come first, as for CoIN's ZeRO-3 offload).
    assert first.startswith("# accelerate launch ") and f" lvlm_cl/train.py recipes/{path.name}" in first
    assert cfg.output_dir == "runs/" + path.stem


def test_output_dirs_are_distinct():
    outs = [yaml.safe_load(p.read_text())["output_dir"] for p in RECIPES]
    assert len(outs) == len(set(outs))
