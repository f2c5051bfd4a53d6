"""Resume after any interruption: a run killed with SIGKILL in the middle of a task or in the middle of an
evaluation, started again with the same command, ends with the metrics.json of a run that never stopped
(timings aside), exactly. A damaged step checkpoint is refused and the task starts over, to the same end."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, write_colour_tasks, write_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ("train_seconds", "eval_seconds")
# The seed method's pair plus EWC: prompts and keys in the model, the queries seen so far, a memory bank,
# Fisher sums accumulating within the task.
METHODS = "methods=[task_prompts, {name: replay, memory_per_task: 4}, ewc]"
# Long enough (at this learning rate) for the routed model to answer with words after each task: the resumed
# evaluations decode several tokens with the prompts and routing in the decoding cache, not an empty answer.
STEPS = 30


def command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "lvlm_cl/train.py", str(recipe), f"output_dir={out}", *SMALL_MODEL, METHODS,
            f"trainer.steps_per_task={STEPS}", "trainer.lr=1e-3", "trainer.save_every=5", "trainer.log_every=1",
            "trainer.max_new_tokens=12", "trainer.eval_batch_size=2"]


def results(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in TIMINGS:
        metrics.pop(key)
    return metrics


def kill_when(cmd: list[str], ready, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` is true (polled every 5 ms)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if ready():
                proc.kill()
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -9, f"the run ended (code {proc.returncode}) before it could be killed"


def step_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "checkpoints" / "step" / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resume(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    files = write_colour_tasks(root / "data", n_train=32, n_test=12)
    recipe = write_recipe(root / "r.yaml", files, root / "unused")
    resume(command(recipe, root / "reference"))
    for stage in ("after-00-colour", "after-01-warmth"):
        predictions = [json.loads(line)["prediction"] for f in (root / "reference" / "predictions" / stage).glob("*.jsonl")
                       for line in f.read_text().splitlines()]
        assert any(len(p) >= 3 for p in predictions), f"{stage}: the trained model answers nothing: {predictions}"
    return root, recipe, results(root / "reference")


def test_killed_in_the_middle_of_a_task_resumes_to_the_same_metrics(reference):
    root, recipe, expected = reference
    out = root / "mid-task"
    cmd = command(recipe, out)
    kill_when(cmd, lambda: (step_meta(out) or {}).get("task_index") == 1)
    meta = step_meta(out)
    assert meta["task"] == "warmth" and 5 <= meta["step"] < STEPS        # killed inside the second task
    state = json.loads((out / "run_state.json").read_text())
    assert state["trained"] == 1
    damaged = root / "mid-task-damaged"
    shutil.copytree(out, damaged)

    log = resume(cmd)
    assert "resuming after task 1/2 (colour)" in log and f"resuming task warmth at step {meta['step']}/{STEPS}" in log
    assert results(out) == expected
    assert not (out / "checkpoints" / "step").exists()            # superseded by the task's checkpoint

    # A damaged step checkpoint is refused with the reason; the task starts over from the last finished
    # task's checkpoint (every task starts from its own seed) and the run still ends the same.
    with open(damaged / "checkpoints" / "step" / "methods-rank0.safetensors", "ab") as f:
        f.write(b"garbage")
    (damaged / "checkpoints" / ".step.tmp").mkdir()                  # a save killed half-way: ignored
    log = resume(command(recipe, damaged))
    assert "step checkpoint not used, task warmth starts over" in log and "methods-rank0.safetensors is missing or damaged" in log
    assert "resuming task warmth at step" not in log
    assert results(damaged) == expected
    assert not (damaged / "checkpoints" / ".step.tmp").exists()


def test_killed_in_the_middle_of_an_evaluation_resumes_to_the_same_metrics(reference):
    root, recipe, expected = reference
    out = root / "mid-eval"
    cmd = command(recipe, out)
    stage = out / "predictions" / "after-01-warmth"
    kill_when(cmd, lambda: (stage / "colour.jsonl").exists())     # the last evaluation, half done
    assert not (stage / "warmth.jsonl").exists()
    state = json.loads((out / "run_state.json").read_text())
    assert state["trained"] == 2 and len(state["rows"]) == 1       # trained, not yet scored
    log = resume(cmd)
    assert "resuming after task 2/2 (warmth)" in log
    assert results(out) == expected


def test_a_damaged_task_checkpoint_is_set_aside_and_its_task_trained_again(reference):
    root, recipe, expected = reference
    out = root / "damaged-task"
    shutil.copytree(root / "reference", out)
    ck = out / "checkpoints" / "task-01-warmth" / "trainable.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])                              # truncated
    log = resume(command(recipe, out))
    assert "task-01-warmth is damaged" in log and "task warmth will be trained again" in log
    assert "resuming after task 1/2 (colour)" in log
    assert (out / "checkpoints" / ".damaged-task-01-warmth").is_dir()   # kept for inspection, not read again
    assert results(out) == expected


def test_atomic_writes_leave_the_old_file_when_a_write_fails(tmp_path):
    from lvlm_cl.io import atomic_save, atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"rows": [1]})

    def fails(name):
        Path(name).write_text('{"rows": [1, 2')                       # half written, then the writer dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(target, fails)
    assert json.loads(target.read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]   # no temporary file left behind
