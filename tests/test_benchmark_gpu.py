"""scripts/benchmark_gpu.py runs its two loops on the tiny size on the CPU, and they train the same thing.
(Its numbers are for a GPU and measured by hand: docs/benchmarks.md.)"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_gpu  # noqa: E402

TINY = benchmark_gpu.SIZES["tiny"]


@pytest.mark.slow
def test_records_are_image_tokens_then_text_with_a_labelled_answer():
    from lvlm_cl.data.encoding import IGNORE_INDEX

    records = benchmark_gpu.make_records(TINY, 3)
    assert TINY.image_tokens == 16
    for r in records:
        ids, labels = r.input_ids, r.labels
        assert ids.numel() == TINY.tokens and ids[0] == benchmark_gpu.BOS_ID and ids[-1] == benchmark_gpu.EOS_ID
        assert int((ids == benchmark_gpu.IMAGE_TOKEN_ID).sum()) == TINY.image_tokens
        answer = labels != IGNORE_INDEX
        assert int(answer.sum()) == TINY.answer_tokens and answer[-TINY.answer_tokens:].all()
        assert torch.equal(labels[answer], ids[answer])
        assert r.pixel_values.shape == (1, 3, 56, 56)
    assert not torch.equal(records[0].input_ids, records[1].input_ids)


@pytest.mark.slow
def test_flops_are_counted_per_record_and_lvlm_cl_skips_the_vocabulary_projection(tmp_path):
    from lvlm_cl.data.encoding import collate_train

    ctx = SimpleNamespace(size=TINY, device=torch.device("cpu"), records=benchmark_gpu.make_records(TINY, 2))
    cfg = benchmark_gpu.setting_config(2, False, 2, str(tmp_path))
    assert cfg.model.lora.r == 128 and cfg.model.lora.modules_to_save == ["multi_modal_projector"]
    counts = {}
    for name, (setup, loss_of, _) in benchmark_gpu.LOOPS.items():
        model = setup(ctx, cfg)
        model.train()
        one, two = (benchmark_gpu.step_flops(model, collate_train(ctx.records[:k], benchmark_gpu.PAD_ID), loss_of,
                                             ctx.device) for k in (1, 2))
        assert two == 2 * one > 0      # every record has the same length: a batch costs its size times one
        counts[name] = one
    # The plain loop projects every position onto the 32064-token vocabulary (forward and input gradient);
    # lvlm-cl only the answer's positions.
    hidden, skipped = TINY.text["hidden_size"], TINY.tokens - TINY.answer_tokens
    assert counts[benchmark_gpu.PLAIN] - counts[benchmark_gpu.LVLM_CL] == 2 * 2 * skipped * hidden * benchmark_gpu.VOCAB


@pytest.mark.slow
def test_benchmark_runs_both_loops_in_both_checkpointing_settings(tmp_path):
    # A child process: the script's accelerator is bf16, and accelerate allows one mixed-precision setting per
    # process (a later Accelerator(mixed_precision="no") in this test process would be refused).
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "scripts/benchmark_gpu.py", "--size", "tiny", "--device", "cpu", "--steps", "1",
           "--warmup", "1", "--rounds", "1", "--batch-sizes", "2", "--gradient-checkpointing", "both",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["size"] == "tiny"
    assert result["versions"]["torch"] == torch.__version__ and result["peak_matmul"]["peak_flops"] > 0

    rows = {(r["loop"], r["gradient_checkpointing"]): r for r in result["rows"]}
    loops = (benchmark_gpu.PLAIN, benchmark_gpu.LVLM_CL)
    assert set(rows) == {(name, ck) for name in loops for ck in (True, False)}
    for (name, _), r in rows.items():
        assert r["status"] == "ok" and r["batch_size"] == 2 and r["seconds_per_step"] > 0
        assert r["tokens_per_step"] == 2 * TINY.tokens and r["tokens_per_second"] > 0
        assert r["flops_per_step"] == 2 * result["flops_per_record"][name]
        assert 0 < r["mfu"] <= 1
        assert r["peak_memory_gib"] is None           # not measured per setting on a CPU
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        # random weights predict about uniformly over the vocabulary: the labels are real answer tokens
        assert abs(r["first_loss"] - math.log(benchmark_gpu.VOCAB)) < 0.5
    assert result["flops_per_record"][benchmark_gpu.PLAIN] > result["flops_per_record"][benchmark_gpu.LVLM_CL]
    for ck in (True, False):
        # The same base weights (LoRA starts as the identity), the same first batch: the same loss, whichever
        # logits each loop computes.
        plain, ours = rows[(benchmark_gpu.PLAIN, ck)], rows[(benchmark_gpu.LVLM_CL, ck)]
        assert plain["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-3)
    assert max(result["initial_loss_relative_difference"].values()) < 1e-3
    assert "| lvlm-cl | 2 | no |" in proc.stdout
