"""A careless or hostile recipe or run folder: numeric keys out of range and names that would become paths
are refused by key; --overwrite removes only a run's own files, and never '.', the home or the working
folder; one run at a time per folder; a killed run's temporaries are removed; the config is written once
the inputs are checked; SIGTERM ends with one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_MODEL, write_recipe
from lvlm_cl.checkpoint import CheckpointError, lock_run_dir, prepare_run_dir, remove_orphans
from lvlm_cl.config import ConfigError, check_name, load_recipe
from lvlm_cl.train import main

ROOT = Path(__file__).resolve().parent.parent
BASE = [*SMALL_MODEL, "trainer.steps_per_task=2", "trainer.eval_max_samples=4"]


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "key 'seed' must be an integer from 0 to 4294967295, got -1"),
    ("seed=1099511627776", "key 'seed' must be an integer from 0 to 4294967295"),
    ("trainer.lr=.nan", "key 'trainer.lr' must be a finite number above 0, got nan"),
    ("trainer.lr=.inf", "key 'trainer.lr' must be a finite number above 0, got inf"),
    ("trainer.lr=0", "key 'trainer.lr' must be a finite number above 0"),
    ("trainer.weight_decay=-0.1", "key 'trainer.weight_decay' must be a finite number, 0 or more"),
    ("trainer.weight_decay=.nan", "key 'trainer.weight_decay' must be a finite number, 0 or more"),
    ("trainer.max_grad_norm=-1", "key 'trainer.max_grad_norm' must be a finite number above 0, or null"),
    ("trainer.eval_max_samples=-1", "key 'trainer.eval_max_samples' must be at least 1, or null"),
    ("trainer.warmup_steps=-2", "key 'trainer.warmup_steps' must be 0 or more"),
    ("trainer.num_workers=-1", "key 'trainer.num_workers' must be 0"),
    ("trainer.save_every=-1", "key 'trainer.save_every' must be 0"),
    ("trainer.batch_size=0", "key 'trainer.batch_size' must be at least 1"),
    ("trainer.grad_accum=0", "key 'trainer.grad_accum' must be at least 1"),
    ("trainer.eval_batch_size=0", "key 'trainer.eval_batch_size' must be at least 1"),
    ("trainer.max_new_tokens=0", "key 'trainer.max_new_tokens' must be at least 1"),
    ("trainer.log_every=0", "key 'trainer.log_every' must be at least 1"),
    ("trainer.steps_per_task=0", "key 'trainer.steps_per_task' must be at least 1"),
    ("model.max_length=4", "key 'model.max_length' must be at least 8"),
    ("model.lora={r: 0}", "key 'model.lora.r' must be at least 1"),
    ("model.lora={dropout: 1.0}", "key 'model.lora.dropout' must be from 0 up to (not including) 1"),
    ("model.tiny.text_layers=0", "key 'model.tiny.text_layers' must be at least 1"),
    ("model.tiny.patch_size=7", "key 'model.tiny.image_size' (32) must be a multiple of 'model.tiny.patch_size'"),
    ("report_to=[wandb]", "key 'report_to[0]': wandb is not installed here"),
    ("report_to=[nonsense]", "key 'report_to[0]': unknown tracker 'nonsense'"),
    ("model.chat_template=/nowhere/template.jinja", "key 'model.chat_template': /nowhere/template.jinja not found"),
])
def test_every_numeric_key_has_a_range_and_names_it(tmp_path, colour_tasks, override, message):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, [override])
    assert f"r.yaml: {message}" in str(e.value)


def test_epochs_per_task_is_finite_and_positive(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    for bad in (".nan", "-1", "0"):
        with pytest.raises(ConfigError, match="key 'trainer.epochs_per_task' must be a finite number above 0"):
            load_recipe(recipe, ["trainer.steps_per_task=null", f"trainer.epochs_per_task={bad}"])


def test_a_key_given_twice_and_a_recipe_that_is_not_utf8_are_refused(tmp_path, colour_tasks):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    text = recipe.read_text()
    recipe.write_text(text + "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not valid YAML: .*key 'seed' is given twice"):
        load_recipe(recipe)
    recipe.write_bytes(text.encode() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"r.yaml: not UTF-8 text \(byte \d+"):
        load_recipe(recipe)


@pytest.mark.parametrize("name", ["../../../../victim", "/tmp/absolute", "a/b", "..", ".hidden", "", "a..b",
                                  "x" * 101, "tab\tname", "nul\x00"])
def test_a_task_name_that_would_be_a_path_is_refused(tmp_path, colour_tasks, name):
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data["tasks"][0]["name"] = name
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"key 'tasks\[0\].name': .* is not a safe file name"):
        load_recipe(recipe)
    assert check_name("colour") is None and check_name("vqa-v2_2024.1") is None


def test_overwrite_removes_only_a_runs_own_files_and_never_a_protected_folder(tmp_path, monkeypatch):
    config = {"output_dir": "x", "model": {}, "trainer": {}}
    run = tmp_path / "run"
    (run / "checkpoints" / "task-00-a").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text("{}")
    prepare_run_dir(run, config, overwrite=True)
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()

    # a folder with anything a run does not write is not emptied
    (run / "config.json").write_text(json.dumps(config))
    (run / "my_thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match=r"--overwrite refused: .* is not a run folder of lvlm-cl .*my_thesis.tex"):
        prepare_run_dir(run, config, overwrite=True)
    assert (run / "my_thesis.tex").read_text() == "years of work"

    # nor '.', '', the working folder or its parents, the home folder, the root
    work = tmp_path / "work" / "repo"
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(config))
    (work / "versions.json").write_text("{}")
    monkeypatch.chdir(work)
    for target in (Path("."), Path(""), work, work.parent, Path("/")):
        with pytest.raises(CheckpointError, match="--overwrite refused: output_dir .* is (an empty output_dir|the "
                                                  "working folder|the root)"):
            prepare_run_dir(target, config, overwrite=True)
    monkeypatch.setenv("HOME", str(work.parent.parent))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="is the home folder"):
        prepare_run_dir(work.parent.parent, config, overwrite=True)
    assert (work / "config.json").is_file()


def test_one_run_at_a_time_per_folder(tmp_path, colour_tasks, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out)
    held = lock_run_dir(out)                       # as another run would hold it
    try:
        code = main([str(recipe), *BASE])
        err = capsys.readouterr().err
        assert code == 2 and f"another run is using {out}" in err
    finally:
        held.release()
    assert main([str(recipe), *BASE]) == 0        # free again: it runs


def test_a_killed_runs_temporaries_are_removed_and_its_last_good_copies_kept(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    for name in (".task-01-warmth.k2j4h5g6", ".task-00-colour.old", ".damaged-task-00-colour", "task-00-colour"):
        (ck / name).mkdir(parents=True)
    (run / ".metrics.json.abc123.tmp").write_text("half")
    (run / "metrics.json").write_text("{}")
    removed = remove_orphans(run)
    assert sorted(p.name for p in removed) == [".metrics.json.abc123.tmp", ".task-01-warmth.k2j4h5g6"]
    assert sorted(p.name for p in ck.iterdir()) == [".damaged-task-00-colour", ".task-00-colour.old", "task-00-colour"]


def test_the_config_is_written_once_the_inputs_pass_so_a_fixed_recipe_starts_there(tmp_path, colour_tasks, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out)
    train_file = colour_tasks["warmth"][0]
    good = train_file.read_text()
    train_file.write_text(good.replace('"Is this color warm or cold?"', '"' + "long " * 400 + '"', 1))
    assert main([str(recipe), *BASE]) == 2 and "exceed model.max_length" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    train_file.write_text(good)
    assert main([str(recipe), *BASE, "trainer.lr=1e-3"]) == 0      # the fixed (and changed) recipe runs there
    assert json.loads((out / "config.json").read_text())["trainer"]["lr"] == 1e-3


@pytest.mark.slow
def test_sigterm_ends_the_run_with_one_line_and_the_same_command_resumes(tmp_path, colour_tasks):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out, steps_per_task=60, save_every=5, log_every=5)
    cmd = [sys.executable, "lvlm_cl/train.py", str(recipe), *SMALL_MODEL, "trainer.eval_max_samples=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step" / "meta.json").is_file() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "lvlm_cl: terminated; run the same command to resume" in err and "Traceback" not in err
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming task colour at step" in resumed.stdout
    assert json.loads((out / "metrics.json").read_text())["num_completed"] == 2


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, colour_tasks, capsys, monkeypatch):
    import errno

    import lvlm_cl.train as train

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(train, "atomic_write_json", full)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", colour_tasks, out)
    assert main([str(recipe), *BASE]) == 2
    err = capsys.readouterr().err
    assert err == f"lvlm_cl: error: {out / 'versions.json'}: No space left on device\n"


@pytest.mark.parametrize("entry", ["evaluate", "chat"])
def test_evaluate_and_chat_say_one_line_for_a_folder_that_is_not_a_run(tmp_path, capsys, entry):
    from lvlm_cl import chat, evaluate

    (tmp_path / "data.jsonl").write_text("{}\n")
    args = (["--run", str(tmp_path / "nothing"), "--data", str(tmp_path / "data.jsonl"), "--metric", "exact_match"]
            if entry == "evaluate" else ["--run", str(tmp_path / "nothing"), "--prompt", "hi"])
    code = (evaluate if entry == "evaluate" else chat).main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lvlm_cl: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-task run to point evaluate and chat at."""
    from conftest import write_colour_tasks
    from lvlm_cl.train import run

    root = tmp_path_factory.mktemp("trained")
    tasks = write_colour_tasks(root / "data", n_train=8, n_test=4)
    recipe = write_recipe(root / "r.yaml", tasks, root / "run", steps_per_task=2)
    run(load_recipe(recipe, [*SMALL_MODEL]), progress=False)
    return root / "run", tasks


def _bad_data(tmp_path: Path, kind: str) -> Path:
    from conftest import record

    path = tmp_path / "data.jsonl"
    good = json.dumps(record("ok", None, "What colour?", "red"))
    if kind == "latin-1":
        path.write_bytes(good.encode() + b"\n" + json.dumps(record("b", None, "caf\u00e9", "x"),
                                                              ensure_ascii=False).encode("latin-1") + b"\n")
    elif kind == "bad json":
        path.write_text(good + "\n{not json\n")
    elif kind == "missing image":
        path.write_text(good + "\n" + json.dumps(record("img", "nowhere.png", "q", "a")) + "\n")
    elif kind == "roles":
        bad = record("r", None, "q", "a")
        bad["messages"].reverse()
        path.write_text(json.dumps(bad) + "\n")
    elif kind == "empty":
        path.write_text("")
    return path


def assert_one_error_line(code: int, err: str, message: str) -> None:
    """Exit code 2 and a last stderr line ``lvlm_cl: error: ...`` holding ``message``, no traceback (transformers'
    own progress bar may come first, when a model loads)."""
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("lvlm_cl: error: ") and message in last, err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("latin-1", "data.jsonl:2: not UTF-8 text"),
    ("bad json", "data.jsonl:2: invalid JSON"),
    ("missing image", "data.jsonl, record 'img', field 'images[0]': image not found"),
    ("roles", "data.jsonl:1, record 'r', field 'messages[0].role'"),
    ("empty", "data.jsonl: no records (the file is empty)"),
    ("no run", "is not a run folder"),
])
def test_evaluate_names_every_bad_input_in_one_line(tmp_path, trained, capsys, kind, message):
    from lvlm_cl import evaluate

    run_dir, _ = trained
    data = _bad_data(tmp_path, "empty" if kind == "no run" else kind)
    if kind == "no run":
        data.write_text(json.dumps({"id": "x"}) + "\n")
        run_dir = tmp_path
    code = evaluate.main(["--run", str(run_dir), "--data", str(data), "--metric", "exact_match",
                          "--output", str(tmp_path / "out")])
    assert_one_error_line(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()                  # nothing written for input that was refused


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("missing image", "--image"),
    ("not an image", "cannot"),
    ("no run", "no such folder"),
    ("stage out of range", "stage"),
])
def test_chat_names_every_bad_input_in_one_line(tmp_path, trained, capsys, kind, message):
    from lvlm_cl import chat

    run_dir, _ = trained
    args = ["--run", str(run_dir), "--prompt", "What colour?"]
    if kind == "missing image":
        args += ["--image", str(tmp_path / "nowhere.png")]
    elif kind == "not an image":
        (tmp_path / "x.png").write_bytes(b"plain text, not a picture")
        args += ["--image", str(tmp_path / "x.png")]
    elif kind == "no run":
        args[1] = str(tmp_path / "nothing")
    else:
        args += ["--stage", "7"]
    import io

    code = chat.main(args, stdout=io.StringIO())
    assert_one_error_line(code, capsys.readouterr().err, message)


def test_a_name_that_leads_outside_its_folder_is_refused(tmp_path):
    from lvlm_cl.io import PathEscapeError, under

    root = tmp_path / "run"
    root.mkdir()
    assert under(root, "predictions", "stage-0", "colour.jsonl") == root / "predictions" / "stage-0" / "colour.jsonl"
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    for parts in [("..", "victim"), ("checkpoints", "task-00-../../../../victim"), (str(tmp_path / "abs"),),
                  ("link", "x.json"), (".",), ("",)]:
        with pytest.raises(PathEscapeError, match="leads outside"):
            under(root, *parts)


def test_a_shared_run_whose_files_name_a_path_writes_nothing_outside_it(tmp_path, trained, capsys):
    """A run folder from someone else, its config.json and run_state.json edited to name a task ``../..``: the
    evaluation refuses in one line and nothing appears outside the folders it was given."""
    import shutil

    from lvlm_cl import evaluate

    run_dir, tasks = trained
    shared = tmp_path / "shared" / "run"
    shutil.copytree(run_dir, shared)
    for name in ("config.json", "run_state.json"):
        text = (shared / name).read_text()
        assert '"warmth"' in text
        (shared / name).write_text(text.replace('"warmth"', '"../../../../escaped"'))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = evaluate.main(["--run", str(shared), "--data", str(tasks["colour"][1]), "--metric", "exact_match",
                          "--output", str(tmp_path / "shared" / "out")])
    assert_one_error_line(code, capsys.readouterr().err, "leads outside")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "escaped").exists()
