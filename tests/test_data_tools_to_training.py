"""From a user's LLaVA JSON file to a trained two-task sequence, through data_tools only."""

import json

import pytest
from PIL import Image

from conftest import COLOURS, SMALL_MODEL
from data_tools.cli import main as data_tools
from lvlm_cl.train import main as train

pytestmark = pytest.mark.slow


def llava_file(root, task, question, answer_of, n=40):
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        c = names[i % len(names)]
        Image.new("RGB", (32, 32), COLOURS[c]).save(root / "images" / f"{task}{i}.png")
        records.append({"id": i, "image": f"images/{task}{i}.png",          # int ids, as LLaVA files have
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer_of(c)}]})
    path = root / f"{task}.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_to_trained_sequence(tmp_path):
    raw = tmp_path / "raw"
    tasks = {}
    for task, question, answer_of in [("colour", "What color is the image?", lambda c: c),
                                      ("warmth", "Warm or cold?", lambda c: "warm" if c in ("red", "yellow") else "cold")]:
        src = llava_file(raw, task, question, answer_of)
        out = tmp_path / "data" / f"{task}.jsonl"
        assert data_tools(["convert", "--from", "llava", str(src), "--output", str(out), "--task", task]) == 0
        assert data_tools(["validate", str(out)]) == 0
        assert data_tools(["split", str(out), "--eval-fraction", "0.25", "--seed", "0"]) == 0
        tasks[task] = (out.with_suffix(".train.jsonl"), out.with_suffix(".eval.jsonl"))
        assert tasks[task][0].is_file() and tasks[task][1].is_file()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("\n".join([
        f"output_dir: {tmp_path / 'run'}",
        "tasks:",
        *[f"  - {{name: {n}, train: {tr}, eval: {te}, metric: exact_match}}" for n, (tr, te) in tasks.items()],
        "trainer: {steps_per_task: 80, batch_size: 8, eval_batch_size: 16, max_new_tokens: 4, lr: 0.001}",
        "report_to: []",
    ]))
    assert train([str(recipe), *SMALL_MODEL]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == ["colour", "warmth"]
    # Learnt from the converted data: each task is mostly right just after training on it.
    assert metrics["matrix"][0][0] >= 75 and metrics["matrix"][1][1] >= 75
