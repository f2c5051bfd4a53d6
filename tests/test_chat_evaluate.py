"""scripts/chat.py and scripts/evaluate.py on a real two-task run with task_prompts (it routes)."""

import io
import json
import re

import pytest

from conftest import SMALL_MODEL, png, read_jsonl, write_colour_tasks, write_recipe
from lvlm_cl import chat, evaluate
from lvlm_cl.config import load_recipe
from lvlm_cl.evaluation.scorers import token_f1
from lvlm_cl.train import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_eval")
    files = write_colour_tasks(root / "data", n_train=16, n_test=8)
    out = root / "run"
    recipe = write_recipe(root / "r.yaml", files, out, steps_per_task=3)
    run(load_recipe(recipe, [*SMALL_MODEL, "methods=[task_prompts]"]), progress=False)
    return out, files, root


def test_evaluate_reproduces_the_runs_numbers_on_every_stage(trained, tmp_path):
    out, files, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for t, (name, (_, test)) in enumerate(files.items()):
        dest = tmp_path / name
        code = evaluate.main(["--run", str(out), "--all-stages", "--data", str(test), "--metric", "exact_match",
                              "--output", str(dest), "--export", "coin"])
        assert code == 0
        scores = json.loads((dest / "scores.json").read_text())["scores"]
        assert list(scores) == ["stage-0-colour", "stage-1-warmth"]
        assert list(scores.values()) == [metrics["matrix"][0][t], metrics["matrix"][1][t]]
        preds = read_jsonl(dest / "predictions-stage-1-warmth.jsonl")
        assert len(preds) == 8 and set(preds[0]) >= {"id", "prompt", "prediction", "answer", "correct"}
        coin = read_jsonl(dest / "coin-answers-stage-1-warmth.jsonl")
        assert [set(r) for r in coin] == [{"question_id", "prompt", "text", "answer_id", "model_id"}] * 8
        assert [r["text"] for r in coin] == [p["prediction"] for p in preds]


def test_rescore_scores_the_runs_predictions_again_without_generating(trained, tmp_path, capsys, monkeypatch):
    out, _, _ = trained
    import lvlm_cl.evaluation.generate as generate

    monkeypatch.setattr(generate, "generate_answers", lambda *a, **k: pytest.fail("rescore generated"))
    metrics = json.loads((out / "metrics.json").read_text())
    # With the run's own metric: the run's matrix, initial row and format figures, to the digit.
    assert evaluate.main(["--run", str(out), "--rescore", "--metric", "exact_match", "--output", str(tmp_path / "em")]) == 0
    again = json.loads((tmp_path / "em" / "metrics.json").read_text())
    assert again["matrix"] == metrics["matrix"] and again["initial"] == metrics["initial"]
    assert again["metrics"] == metrics["metrics"] and again["format_errors"] == metrics["format_errors"]
    # With another metric: each cell is that metric's mean over the stage's predictions file.
    assert evaluate.main(["--run", str(out), "--rescore", "--metric", "token_f1"]) == 0
    f1 = json.loads((out / "evaluations" / "rescore-token_f1" / "metrics.json").read_text())
    rows = read_jsonl(out / "predictions" / "after-01-warmth" / "colour.jsonl")
    expected = 100 * sum(token_f1(r["prediction"], r["answer"]) for r in rows) / len(rows)
    assert f1["matrix"][1][0] == pytest.approx(expected) and f1["metric"] == "token_f1"
    assert (out / "evaluations" / "rescore-token_f1" / "report.md").is_file()
    # Predictions missing: one line naming the file; --data and --rescore are one or the other.
    moved = tmp_path / "moved.jsonl"
    (out / "predictions" / "after-00-colour" / "warmth.jsonl").rename(moved)
    try:
        capsys.readouterr()
        assert evaluate.main(["--run", str(out), "--rescore", "--metric", "vqa", "--output", str(tmp_path / "x")]) == 2
        assert "after-00-colour/warmth.jsonl: missing" in capsys.readouterr().err
    finally:
        moved.rename(out / "predictions" / "after-00-colour" / "warmth.jsonl")
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(out), "--rescore", "--data", "x.jsonl", "--metric", "vqa"])


def test_evaluate_refuses_bad_input(trained, tmp_path, capsys):
    out, files, _ = trained
    test = str(files["colour"][1])
    assert evaluate.main(["--run", str(tmp_path / "nope"), "--data", test, "--metric", "exact_match"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert evaluate.main(["--run", str(out), "--stage", "7", "--data", test, "--metric", "exact_match"]) == 2
    assert "stage 7 does not exist" in capsys.readouterr().err
    assert evaluate.main(["--run", str(out), "--data", str(tmp_path / "missing.jsonl"), "--metric", "exact_match"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(out), "--data", test, "--metric", "no_such_metric"])


def test_chat_two_turns_image_switch_routing_and_quit(trained):
    out, _, root = trained
    red, blue = png(root / "red.png", "red"), png(root / "blue.png", "blue")
    stdin = io.StringIO("What color is the image?\nAnd now?\n/image " + str(blue) +
                        "\nIs this color warm or cold?\n\nnever read\n")
    stdout = io.StringIO()
    code = chat.main(["--run", str(out), "--image", str(red), "--show-routing", "--max-new-tokens", "4"],
                     stdin=stdin, stdout=stdout)
    text = stdout.getvalue()
    assert code == 0
    assert text.count("ASSISTANT: ") == 3                      # three turns answered, then the empty line quits
    assert f"[new conversation about {blue}]" in text
    routes = re.findall(r"\[routing: (\w+) \(cos (\S+)\); ", text)   # input is not echoed: lines follow "USER: "
    assert [r[0] for r in routes] == ["colour", "colour", "warmth"]
    assert all(0.9 < float(cos) <= 1.0001 for _, cos in routes)
    assert "never read" not in text


def test_chat_keeps_the_conversation(trained):
    out, _, root = trained
    from lvlm_cl.stage import load_stage

    stage = load_stage(out)
    c = chat.Chat(stage.model, stage.processor, max_length=stage.cfg.model.max_length, task_names=["colour", "warmth"])
    c.set_image(png(root / "green.png", "green"))
    first = c.answer("What color is the image?", temperature=0, max_new_tokens=3)
    c.answer("Is this color warm or cold?", temperature=0, max_new_tokens=3)
    assert [m["role"] for m in c.history] == ["user", "assistant", "user", "assistant"]
    assert c.history[1]["content"][0]["text"] == first
    assert c.history[0]["content"][0] == {"type": "image"} and c.history[2]["content"][0]["type"] == "text"


def test_chat_prompt_once_and_plain_model(trained):
    out, _, root = trained
    img = str(png(root / "yellow.png", "yellow"))
    stdout = io.StringIO()
    assert chat.main(["--run", str(out), "--stage", "0", "--image", img, "--prompt", "What color is the image?",
                      "--max-new-tokens", "3"], stdout=stdout) == 0
    assert len(stdout.getvalue().splitlines()) == 1
    stdout = io.StringIO()
    assert chat.main(["--model", str(out / "base_model"), "--image", img, "--prompt", "What color?", "--show-routing",
                      "--max-new-tokens", "3"], stdout=stdout) == 0
    assert "does not route" in stdout.getvalue()


def test_chat_bad_input_gives_a_clear_error(trained, tmp_path, capsys):
    out, _, root = trained
    img = str(png(root / "red2.png", "red"))
    assert chat.main(["--run", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert chat.main(["--run", str(out), "--stage", "9", "--prompt", "hi"]) == 2
    assert "stage 9 does not exist" in capsys.readouterr().err
    assert chat.main(["--run", str(out), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    assert chat.main(["--model", str(tmp_path), "--image", img, "--prompt", "hi"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
