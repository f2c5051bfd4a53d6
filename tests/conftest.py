"""Shared fixtures: a tiny processor and two small tasks written as canonical JSONL with real PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run pytest -m gpu on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tests never touch the user's cache; one cache per session keeps built models reusable. Session-wide
    # (not monkeypatch, which is per test) so module-scoped fixtures that train also use it.
    old = os.environ.get("LVLM_CL_CACHE")
    os.environ["LVLM_CL_CACHE"] = str(tmp_path_factory.getbasetemp() / "lvlm_cl_cache")
    yield
    if old is None:
        os.environ.pop("LVLM_CL_CACHE", None)
    else:
        os.environ["LVLM_CL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_processor():
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_processor

    return build_tiny_processor(TinyLlavaSize())


IMG = {"type": "image"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def png(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record(rid: str, image: str | None, question: str, answer: str, task: str = "t") -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {"id": rid, "task": task, "images": [image] if image else [],
            "messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_colour_tasks(root: Path, n_train: int = 48, n_test: int = 12) -> dict[str, tuple[Path, Path]]:
    """Two tasks on plain-colour images: name the colour; say whether it is warm or cold."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    tasks = {}
    for task, question, answer_of in [
        ("colour", "What color is the image?", lambda c: c),
        ("warmth", "Is this color warm or cold?", lambda c: "warm" if c in ("red", "yellow") else "cold"),
    ]:
        paths = []
        for split, n in (("train", n_train), ("test", n_test)):
            recs = []
            for i in range(n):
                c = names[i % len(names)]
                img = f"img/{task}-{split}-{i}.png"
                Image.new("RGB", (32, 32), COLOURS[c]).save(root / img)
                recs.append(record(f"{task}-{split}-{i}", img, question, answer_of(c), task))
            path = root / f"{task}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            paths.append(path)
        tasks[task] = tuple(paths)
    return tasks


@pytest.fixture
def colour_tasks(tmp_path):
    return write_colour_tasks(tmp_path / "data")


SMALL_MODEL = ["model.path=builtin:tiny-llava-random", "model.freeze_vision_tower=false",
               "model.tiny.text_hidden=64", "model.tiny.vision_hidden=64", "model.tiny.text_intermediate=128"]


def write_recipe(path: Path, tasks: dict, output_dir: Path, **trainer) -> Path:
    import yaml

    recipe = {
        "output_dir": str(output_dir),
        "model": {"path": "builtin:tiny-llava-random"},
        "tasks": [{"name": n, "train": str(tr), "eval": str(te), "metric": "exact_match"} for n, (tr, te) in tasks.items()],
        "trainer": {"steps_per_task": 30, "batch_size": 8, "eval_batch_size": 16, "max_new_tokens": 4,
                    "log_every": 10, **trainer},
        "report_to": [],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def tiny_small():
    """A small tiny LLaVA (width 64) and its processor, built once; tests deep-copy the model before changing it."""
    from lvlm_cl.models.tiny import TinyLlavaSize, build_tiny_llava

    return build_tiny_llava(TinyLlavaSize(text_hidden=64, vision_hidden=64, text_intermediate=128), seed=0)


def stage_scores(stage) -> list[float]:
    """Score a loaded stage on every task of its stream, the way the training loop does (percent)."""
    from lvlm_cl.evaluation.pipeline import score_records
    from lvlm_cl.models import autocast_for

    row = []
    for task in stage.stream:
        with autocast_for(stage.model):    # as the loop and scripts/evaluate.py generate (bf16 runs)
            scored = score_records(stage.model, stage.processor, task.test_records, task.metric,
                                   max_length=stage.cfg.model.max_length, batch_size=16,
                                   max_new_tokens=stage.cfg.trainer.max_new_tokens, progress=False)
        row.append(scored.percent)
    return row


def assert_reloads_as_trained(model, state, out: Path):
    """The run in ``out`` reloads (its last stage) to exactly the parameters that trained, and the reload scores
    what the run scored after its last task. Returns the stage."""
    import torch

    from lvlm_cl.stage import load_stage

    stage = load_stage(out)
    trained = dict(model.named_parameters())
    for n, p in stage.model.named_parameters():
        assert torch.equal(p, trained[n]), n                      # the checkpoint restores what trained
    assert stage_scores(stage) == state.rows[-1]                   # evaluating the reload = the run's numbers
    return stage


@pytest.fixture(scope="module")
def tiny_left(tiny_small):
    """``tiny_small`` with a processor of its own that pads on the left (generation); tests deep-copy the
    model before changing it."""
    import copy

    model, processor = tiny_small
    processor = copy.deepcopy(processor)
    processor.tokenizer.padding_side = "left"
    return model, processor


def colour_stream(root: Path, n_train: int = 8, n_test: int = 4) -> list:
    """The two colour tasks as the stream of ``Task`` objects the method hooks see."""
    from lvlm_cl.data.records import load_records
    from lvlm_cl.methods.base import Task

    files = write_colour_tasks(root, n_train=n_train, n_test=n_test)
    return [Task(i, name, "exact_match", load_records(tr, task=name), load_records(te, task=name))
            for i, (name, (tr, te)) in enumerate(files.items())]


def task_batch(processor, records: list[dict], task_ids, max_length: int = 512) -> dict:
    """A training batch of ``records`` carrying each sample's task index (an int: all the same)."""
    import torch

    from lvlm_cl.data.dataset import TASK_IDS
    from lvlm_cl.data.encoding import collate_train, encode_record

    batch = collate_train([encode_record(processor, r, max_length) for r in records], processor.tokenizer.pad_token_id)
    ids = [task_ids] * len(records) if isinstance(task_ids, int) else list(task_ids)
    batch[TASK_IDS] = torch.tensor(ids)
    return batch



def forward(model, batch: dict):
    """The model's forward on a ``task_batch`` as the training loop runs it: each sample's routing choice held
    (from ``cl_task_ids``), which the model itself does not receive."""
    from lvlm_cl.models.continual import held_for_batch, model_inputs

    with held_for_batch(model, batch):
        return model(**model_inputs(batch))


def routed_forward(model, batch: dict):
    """The model's forward on a prompt batch with the routing chosen from its instructions (as at inference)."""
    from lvlm_cl.models.continual import held

    with held(model, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")):
        return model(**batch)


def prompt_batch(processor, records: list[dict], max_length: int = 512) -> dict:
    """A left-padded generation batch of ``records``' prompts (everything before the last answer)."""
    from lvlm_cl.data.encoding import collate_prompts, encode_prompt

    return collate_prompts([encode_prompt(processor, r, max_length) for r in records], processor.tokenizer.pad_token_id)


# A real model's recipe cut down to the tiny model (the model path is the caller's): SMALL_MODEL's sizes, a
# rank-4 LoRA, two steps a task, four new tokens, no tracker.
TINY_RUN = ["model.lora.r=4", "model.lora.alpha=8", "trainer.epochs_per_task=null", "trainer.steps_per_task=2",
            "trainer.max_new_tokens=4", "report_to=[]"]


def write_stand_in_data(cfg, root: Path, question_answer, *, n_train: int, n_test: int) -> None:
    """Tiny stand-in data at the paths a real recipe names (relative to ``root``, where it runs): plain-colour
    images (red, green, blue in turn) and, for each task ``t`` of ``cfg``, records whose question and answer
    ``question_answer(t, colour, i, split)`` gives in the task's style."""
    colours = {c: COLOURS[c] for c in ("red", "green", "blue")}
    (root / "img").mkdir(exist_ok=True)
    for c, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(root / "img" / f"{c}.png")
    for t in cfg.tasks:
        for split, n in (("train", n_train), ("test", n_test)):
            recs = []
            for i in range(n):
                colour = list(colours)[i % 3]
                q, a = question_answer(t, colour, i, split)
                recs.append(record(f"{t.name}-{split}-{i}", str(root / "img" / f"{colour}.png"), q, a, t.name))
            path = root / (t.train if split == "train" else t.eval)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def run_recipe_command(recipe: Path, cwd: Path, out: Path, overrides: list[str]) -> dict:
    """``python lvlm_cl/train.py RECIPE output_dir=OUT OVERRIDES...`` run from ``cwd``, as a user runs it; it must
    end with code 0. The run's metrics.json."""
    import subprocess
    import sys

    train = Path(__file__).resolve().parent.parent / "lvlm_cl" / "train.py"
    proc = subprocess.run([sys.executable, str(train), str(recipe), f"output_dir={out}", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())
