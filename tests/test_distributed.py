"""Two processes on CPU through accelerate + DeepSpeed (gloo): ZeRO-2 and ZeRO-3 train two tasks with LoRA
and task_prompts, the saved run evaluates in one process to the same numbers, and the first steps' losses
match a single-process run with the same global batch."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import SMALL_MODEL, stage_scores, write_colour_tasks, write_recipe
from lvlm_cl.config import load_recipe
from lvlm_cl.stage import load_stage
from lvlm_cl.train import run
from lvlm_cl.state_io import load_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [*SMALL_MODEL, "model.freeze_vision_tower=true", "model.freeze_language_model=true",
             "model.lora={r: 4, alpha: 8}", "methods=[task_prompts]", "trainer.log_every=1", "trainer.lr=1e-3"]
# Single process: 8 samples per step. Two processes: 4 each, the same 8 (StepBatchOrder slices a global batch).
STEPS = 4
GLOO_ABORT = "terminate called without an active exception"


def _free_port() -> str:
    # A fresh rendezvous port per launch: back-to-back launches on the default port can find it still taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(config: str, recipe: Path, out: Path, extra=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", f"recipes/accelerate/{config}.yaml",
           "--main_process_port", _free_port(), "lvlm_cl/train.py", str(recipe), f"output_dir={out}", *OVERRIDES,
           "trainer.batch_size=4", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        # Now and then (seen twice in CI, not reproduced on demand) a process of a 2-process gloo run on CPU
        # aborts in native code near the end of a run (docs/distributed.md, "Known issues"). The
        # same command resumes the run, which is what a user does: the test then checks the resumed run.
        warnings.warn(f"gloo abort in a 2-process run, launched again to resume it:\n{proc.stderr[-2000:]}")
        cmd[cmd.index("--main_process_port") + 1] = _free_port()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    files = write_colour_tasks(root / "data", n_train=32, n_test=6)
    recipe = write_recipe(root / "r.yaml", files, root / "unused", steps_per_task=STEPS)
    single = root / "single"
    run(load_recipe(recipe, [*OVERRIDES, "trainer.batch_size=8", f"output_dir={single}"]), progress=False)
    return root, recipe, json.loads((single / "metrics.json").read_text())


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_two_processes_train_save_and_evaluate_in_one(setup, config):
    root, recipe, single = setup
    out = root / config
    proc = _launch(config, recipe, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "batch 4 x accumulation 1 x 2 processes = 8" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_completed"] == 2 and set(metrics["routing_accuracy"]) == {"colour", "warmth"}
    # Same global batch, same data order, same start: the losses agree (each process averages over its own
    # tokens, so the mean of two half-batch means differs from the whole batch's token mean in rounding).
    for task in ("colour", "warmth"):
        two, one = metrics["train_loss"][task], single["train_loss"][task]
        assert len(two) == len(one) == STEPS
        assert two[0] == pytest.approx(one[0], rel=2e-2), (task, two, one)
        assert two == pytest.approx(one, rel=1e-1), (task, two, one)
    # The checkpoint holds whole tensors: one process reloads it and scores what the two processes scored.
    assert stage_scores(load_stage(out)) == metrics["matrix"][-1]


def test_zero3_refuses_a_method_that_needs_whole_parameters(setup):
    root, recipe, _ = setup
    proc = _launch("zero3", recipe, root / "refused", ["methods=[lwf]"])
    assert proc.returncode != 0
    assert "does not run under DeepSpeed ZeRO-3" in proc.stderr and "lwf" in proc.stderr


def test_a_launch_config_whose_batch_disagrees_is_refused(setup, tmp_path):
    root, recipe, _ = setup
    ds = json.loads((ROOT / "recipes/accelerate/zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    launch = (ROOT / "recipes/accelerate/zero2.yaml").read_text().replace("recipes/accelerate/zero2.json",
                                                                           str(tmp_path / "ds.json"))
    (tmp_path / "launch.yaml").write_text(launch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", str(tmp_path / "launch.yaml"),
           "--main_process_port", _free_port(), "lvlm_cl/train.py", str(recipe), f"output_dir={tmp_path / 'out'}",
           *OVERRIDES, "trainer.batch_size=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "train_micro_batch_size_per_gpu=16 but the recipe gives 4 (trainer.batch_size)" in proc.stderr


# Every other registered method under ZeRO-2 and ZeRO-3 (full fine-tuning of the small model, or the
# method's own adapters on a frozen one): two tasks train, the run finishes, and its checkpoint reloads in
# one process to the run's scores; or the method is refused at start with its reason.
ZERO2_METHODS = {
    "finetune": [], "multitask": [], "replay": ["methods=[{name: replay, memory_per_task: 4}]"],
    "lwf": ["methods=[lwf]"],
    "task_lora": ["methods=[{name: task_lora, r: 2}]"], "olora": ["methods=[{name: olora, r: 2}]"],
    "moelora": ["methods=[{name: moelora, r: 4, experts: 2}]"], "ewc": ["methods=[ewc]"],
    "dual_modality": ["methods=[{name: dual_modality, r: 2, length: 2}]"],
    "cross_modal_moe": ["methods=[{name: cross_modal_moe, anchors_per_task: 4}]"],
    "semantic_transfer": ["methods=[{name: semantic_transfer}]"],
}


# Methods that change only which records a task trains on: under ZeRO-3 their model, checkpoint and
# evaluation path is finetune's, which runs there; they run under ZeRO-2 (about 20 s per 2-process launch).
DATA_ONLY = {"multitask", "replay"}
ZERO_CASES = [(config, name) for config in ("zero2", "zero3") for name in sorted(ZERO2_METHODS)
              if not (config == "zero3" and name in DATA_ONLY)]


@pytest.mark.parametrize("config,name", ZERO_CASES)
def test_every_method_runs_under_zero(setup, config, name):
    from lvlm_cl.methods import available

    assert set(ZERO2_METHODS) | {"task_prompts"} == set(available())   # a new method must join this test
    root, recipe, _ = setup
    out = root / f"{config}-{name}"
    extra = ZERO2_METHODS[name] or [f"methods=[{name}]"]
    lora_free = ["model.lora=null", "trainer.steps_per_task=2"]
    if name in ("task_lora", "olora", "moelora", "dual_modality", "cross_modal_moe"):
        lora_free += ["model.freeze_language_model=true"]
    else:
        lora_free += ["model.freeze_language_model=false"]
    proc = _launch(config, recipe, out, [*lora_free, *extra])
    if config == "zero3" and name in ("lwf", "olora", "ewc", "semantic_transfer"):   # whole parameters outside the forward
        assert proc.returncode != 0 and f"method {name!r} does not run under DeepSpeed ZeRO-3" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_completed"] == 2
    assert stage_scores(load_stage(out)) == metrics["matrix"][-1]
    if name == "ewc":       # the gradient hooks saw ZeRO-2's gradients: every micro-step of both processes
        state = load_state(out / "checkpoints" / "task-01-warmth", "methods")["ewc"]
        assert state["micro_steps"] == {"colour": 4, "warmth": 4}
        assert sum(f.sum().item() for f in state["anchors"][0]["fisher"].values()) > 0


def test_ewc_runs_under_ddp_and_a_run_evaluates_sharded(setup, tmp_path):
    """EWC under DDP; scripts/evaluate.py shards too."""
    root, recipe, _ = setup
    out = root / "ddp-ewc"
    proc = _launch("ddp", recipe, out, ["model.lora=null", "model.freeze_language_model=false", "methods=[ewc]",
                                        "trainer.steps_per_task=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_completed"] == 2
    test = json.loads((out / "config.json").read_text())["tasks"][1]["eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", "recipes/accelerate/ddp.yaml",
           "--main_process_port", _free_port(), "scripts/evaluate.py", "--run", str(out), "--data", test,
           "--metric", "exact_match",
           "--output", str(tmp_path / "eval")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]
    assert scores == {"stage-1-warmth": metrics["matrix"][1][1]}


def _kill_when(config: str, recipe: Path, out: Path, extra: list[str], file: str, ready) -> None:
    """Launch a two-process run and kill it (every process, as a power cut would) as soon as ``ready`` holds
    for the JSON in ``out / file``."""
    import signal
    import time

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
           f"recipes/accelerate/{config}.yaml", "--main_process_port", _free_port(), "lvlm_cl/train.py", str(recipe),
           f"output_dir={out}", *OVERRIDES, "trainer.batch_size=4", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        try:
            if ready(json.loads((out / file).read_text())):
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    # The launcher's workers run in their own sessions: kill the whole tree.
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()


# Mid-task resume under ZeRO: a two-process run killed (every process, as a power cut would) after a step
# checkpoint of the second task starts again and ends exactly as a run that never stopped (the run of
# test_deepspeed_two_processes_train_save_and_evaluate_in_one: LoRA + task_prompts, the same settings).
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_a_killed_zero_run_resumes_mid_task_to_the_same_metrics(setup, config):
    root, recipe, _ = setup
    extra = ["trainer.save_every=1"]           # how often step checkpoints are taken changes no result
    if not (root / config / "metrics.json").is_file():    # this test run alone
        assert _launch(config, recipe, root / config).returncode == 0
    out = root / f"{config}-killed"
    meta_path = out / "checkpoints" / "step" / "meta.json"
    _kill_when(config, recipe, out, extra, "checkpoints/step/meta.json", lambda meta: meta["task_index"] == 1)
    meta = json.loads(meta_path.read_text())
    assert meta["task"] == "warmth" and meta["step"] < STEPS and meta["processes"] == 2

    resumed = _launch(config, recipe, out, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming task warmth at step {meta['step']}/{STEPS}" in resumed.stdout
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (root / config, out))
    for key in ("train_seconds", "eval_seconds"):
        want.pop(key), got.pop(key)
    assert got == want


def test_a_zero3_run_stopped_after_a_task_resumes_with_its_partitioned_weights_restored(setup):
    """Resuming after a finished task writes the task checkpoint's tensors back into the model. Under ZeRO-3
    the model is built partitioned, and task_lora trains the projector, whose parameters hold an empty shard
    on each process: they are gathered to be written (the copy into an empty shard failed; CI met it when a
    gloo abort made a run resume). The resumed run ends as the run that never stopped."""
    root, recipe, _ = setup
    extra = ["model.lora=null", "trainer.steps_per_task=2", "model.freeze_language_model=true",
             "methods=[task_lora]", "trainer.save_every=0"]          # no step checkpoint: resume after the task
    whole_run = root / "zero3-task_lora-whole"          # the same settings, never stopped
    assert _launch("zero3", recipe, whole_run, extra).returncode == 0
    out = root / "zero3-task_lora-stopped"
    _kill_when("zero3", recipe, out, extra, "run_state.json", lambda state: state["trained"] == 1)
    assert json.loads((out / "run_state.json").read_text())["trained"] == 1

    resumed = _launch("zero3", recipe, out, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after task 1/2 (colour)" in resumed.stdout
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (whole_run, out))
    for key in ("train_seconds", "eval_seconds"):
        want.pop(key), got.pop(key)
    assert got == want


def test_zero3_trains_the_seed_method_over_three_tasks_with_a_memory_bank(tmp_path):
    """Issue 17: with replayed records of several tasks and instructions of many phrasings, the processes'
    query caches differ; every collective must still be the same on both (a cache hit used to skip the query
    encoder's ZeRO-3 forward on one process only: the run hung or gloo aborted). The built-in model is also
    built whole under a ZeRO-3 launch (it used to be written to the cache with empty, partitioned weights).
    The recipe's own methods: each task's prompt and LoRA adapter, the new adapter copied from the previous
    one's partitioned parameters, replayed records through the task in training's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "LVLM_CL_CACHE": str(tmp_path / "cache")}          # a fresh cache: the built-in model is built here
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
           "recipes/accelerate/zero3.yaml", "--main_process_port", _free_port(), "lvlm_cl/train.py",
           "recipes/seq5.yaml", f"output_dir={out}", *SMALL_MODEL, "model.freeze_language_model=true",
           "benchmark={name: seq5, tasks: [digits, scienceqa, vqa], train_size: 96, test_size: 8}",
           "trainer.steps_per_task=12", "trainer.epochs_per_task=null", "trainer.batch_size=8",
           "trainer.eval_batch_size=8", "report_to=[]"]
    # A collective mismatch hangs rather than fails: the timeout turns it into a failure.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_completed"] == 3 and metrics["memory_records"]          # the bank replayed
    assert set(metrics["routing_accuracy"]) == {"digits", "scienceqa", "vqa"}


def test_a_multi_process_launch_on_an_unbuilt_pretrained_base_says_how_to_build_it(tmp_path):
    """The pretrained tiny base is built by a training run of its own, in one process: several processes
    are told to build it first instead of starting a nested run that would wait on the others."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LVLM_CL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
           "recipes/accelerate/ddp.yaml", "--main_process_port", _free_port(), "lvlm_cl/train.py", "recipes/seq5.yaml",
           f"output_dir={tmp_path / 'run'}", "report_to=[]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "the pretrained tiny base is not built yet" in proc.stderr and "python -m lvlm_cl.pretrain" in proc.stderr
    assert not (tmp_path / "cache" / "pretrain-runs").exists()              # no nested run was started
