"""The whole command on a tiny random LLaMA: pruning, post fine-tuning, export, report, resume, errors."""
import gc
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import checkpoint
import llama
import flags
import memory_plan
import nuteprune as npr
import runner
from conftest import ROOT, args, ft


def test_smoke_whole_command(files, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "nuteprune.py"), *args(files, out), *ft(files)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "prune [" in r.stderr and "finetune [" in r.stderr  # progress bars
    report = json.loads((out / "report.json").read_text())
    for key in ("target", "sparsity", "sparsity_total", "params_dense", "params_pruned", "hidden", "layers",
                "ppl_before", "ppl_after", "wall_time_s"):
        assert key in report
    assert abs(report["sparsity"] - 0.5) <= 0.005 and len(report["layers"]) == 2
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    prune = [ln for ln in lines if ln["phase"] == "prune"]
    assert [ln["step"] for ln in prune] == [2, 4, 6, 8, 10, 12]
    assert prune[-1]["teacher_sparsity"] > 0  # a snapshot taught
    for key in ("loss", "kd", "layer", "l0", "expected_sparsity", "target", "lambda_1", "lambda_2",
                "teacher_sparsity", "lr_lora", "lr_mask", "lr_lambda"):
        assert key in prune[0]
    assert [ln["step"] for ln in lines if ln["phase"] == "finetune"] == [2, 4]
    assert "expected_sparsity" in r.stdout  # greppable lines

    # the exported model is what load_run's masked model computes, and its size is the report's
    pruned = checkpoint.load_model(out / "pruned")
    model, masks, tok = npr.load_run(out)
    assert llama.count_params(pruned) == report["params_pruned"]
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(pruned(idx), model(idx, masks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("distill", ["kd", "none", "pkd-no-layer-loss"])
def test_ablations_run(files, tmp_path, distill):
    extra = ("--distill", "pkd", "--layer-weight", "0") if distill == "pkd-no-layer-loss" else ("--distill", distill)
    report = runner.run(npr, *flags.parse_args(args(files, tmp_path, *extra, "--no-lora", "--max-steps", "4"), npr.RunConfig))
    assert abs(report["sparsity"] - 0.5) <= 0.005


@pytest.mark.parametrize("kill_in", ["prune", "finetune"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(files, tmp_path, monkeypatch, kill_in):
    npr.main(args(files, tmp_path / "a", *ft(files)))

    class Killed(Exception):
        pass

    if kill_in == "prune":  # dies in step 10 (0-based 9), after the checkpoint of step 8
        target_at = npr.target_at
        monkeypatch.setattr(npr, "target_at", lambda step, *a: (_ for _ in ()).throw(Killed()) if step == 9
                            else target_at(step, *a))
    else:  # dies in fine-tuning step 3 (two micro-batches per step), after the checkpoint of step 2
        calls, pad_batch = [], npr.data.pad_batch

        def dying_pad_batch(*a):
            calls.append(1)
            if len(calls) == 6:
                raise Killed()
            return pad_batch(*a)
        monkeypatch.setattr(npr.data, "pad_batch", dying_pad_batch)
    with pytest.raises(Killed):
        npr.main(args(files, tmp_path / "b", *ft(files)))
    monkeypatch.undo()
    assert not (tmp_path / "b" / "report.json").exists()
    npr.main(["--resume", str(tmp_path / "b")])

    a, b = (torch.load(tmp_path / x / "state.pt", weights_only=True) for x in ("a", "b"))
    assert a["snapshots"][-1]["level"] == 24 and a["stage2_start"] is not None  # the teachers' machinery ran
    for group in ("head", "intermediate", "hidden"):
        assert torch.equal(a["final_masks"][group], b["final_masks"][group])
    for key in ("gates", "lora", "ft_lora"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    log_a, log_b = ((tmp_path / x / "log.jsonl").read_text() for x in ("a", "b"))
    assert log_a == log_b
    ra, rb = (json.loads((tmp_path / x / "report.json").read_text()) for x in ("a", "b"))
    assert ra["sparsity"] == rb["sparsity"] and ra["ppl_after"] == rb["ppl_after"]


def test_distillation_step_holds_one_copy_of_the_base_weights(files, tmp_path, monkeypatch):
    seen = []
    forward = llama.Llama.forward

    def spy(self, idx, masks=None, output_hidden=False, **kw):
        if output_hidden:  # the teacher's and the student's forwards of a distillation step
            snapshot_teacher = masks is not None and not torch.is_grad_enabled()
            models = sum(type(o) is llama.Llama for o in gc.get_objects()) if snapshot_teacher else 1
            weight = self.model.layers[0].self_attn.q_proj.weight
            seen.append((torch.is_grad_enabled(), weight.data_ptr(), models, masks is not None))
        return forward(self, idx, masks, output_hidden, **kw)
    monkeypatch.setattr(llama.Llama, "forward", spy)
    runner.run(npr, *flags.parse_args(args(files, tmp_path), npr.RunConfig))
    probe, seen = seen[:-48], seen[-48:]  # before the first step: runner.check_activations reads the intact model
    assert probe and all(not grad and not masked for grad, _, _, masked in probe)
    assert [s[0] for s in seen] == [False, True] * 24  # 12 steps x 2 micro-batches: the teacher, then the student
    assert any(s[3] for s in seen if not s[0])  # snapshots taught, not only the intact model
    assert len({s[1] for s in seen}) == 1  # every forward read the same weight storage
    assert all(s[2] == 1 for s in seen)  # and no second model existed while a snapshot taught


def test_user_errors_print_one_line_and_exit_2(files, tmp_path, capsys):
    for bad in (["--ckpt", str(tmp_path / "missing"), "--target", "0.5", "--data", "x"],
                args(files, tmp_path / "o", "--target", "1.5"),
                ["--resume", str(tmp_path / "nothing")],
                args(files, tmp_path / "o", "--batch-size", "1000")):
        with pytest.raises(SystemExit) as e:
            npr.main(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_every_flag_explains_itself():
    parser = flags.build_parser(npr.RunConfig)
    assert all(a.help for a in parser._actions)
    text = parser.format_help()
    for flag in ("--ckpt", "--target", "--tokenizer", "--data", "--out", "--max-steps", "--seed", "--resume",
                 "--distill", "--no-lora", "--gap", "--interval", "--ft-data", "--device"):
        assert flag in text


def test_ckpt_demo_fills_paths_and_budget(files, monkeypatch):
    """`--ckpt demo` (the README's first command) takes the demo's files and CPU budget; explicit flags still win."""
    import demo
    paths = {"ckpt": str(files / "model"), "tokenizer": str(files / "tok.model"),
             "train_text": str(files / "corpus.txt"), "heldout_text": str(files / "corpus.txt")}
    monkeypatch.setattr(demo, "ensure_demo", lambda cache_dir=None: paths)  # the real build takes ~2 minutes
    a, resume = flags.parse_args(["--ckpt", "demo", "--target", "0.5", "--batch-size", "4"], npr.RunConfig)
    assert resume == "new"
    assert (a.ckpt, a.tokenizer, a.data, a.heldout) == (paths["ckpt"], paths["tokenizer"], paths["train_text"],
                                                        paths["heldout_text"])
    assert a.max_steps == flags.DEMO_DEFAULTS["max_steps"] and a.block_size == flags.DEMO_DEFAULTS["block_size"]
    assert a.batch_size == 4  # given on the command line
    c, _ = flags.parse_args(["--ckpt", str(files / "model"), "--target", "0.5", "--data", str(files / "corpus.txt")],
                            npr.RunConfig)
    assert c.max_steps is None


@pytest.mark.parametrize("command, argv", [
    ("nuteprune.py", ["--ckpt", "demo", "--target", "50%"]),  # argparse's own error, before the demo is built
    ("nuteprune.py", ["--ckpt", "demo", "--target", "50"]),  # our check, before the demo is built
    ("nuteprune.py", ["--ckpt", "demo", "--target", "0.5", "--distill", "pk"]),
    ("evaluate.py", ["--ckpt", "x", "--limit", "ten"]),
])
def test_malformed_flags_print_one_line(command, argv, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / command), *argv], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env={**os.environ, "NUTEPRUNE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: no demo build, no output folder


def test_a_failed_start_leaves_no_output_folder(files, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")  # a checkpoint directory with a broken config
    with pytest.raises(SystemExit):
        npr.main(args(files, tmp_path / "out") + ["--ckpt", str(tmp_path / "bad")])
    assert not (tmp_path / "out").exists()


def test_eval_every_logs_the_student_and_each_snapshot_teacher(files, tmp_path):
    npr.main(args(files, tmp_path, "--eval-every", "4"))
    lines = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if ln["phase"] == "eval"]
    assert [ln["step"] for ln in evals] == [4, 8, 12] and all(ln["student_ppl"] > 1 for ln in evals)
    snaps = [ln for ln in lines if ln["phase"] == "snapshot"]
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert [(s["level"], s["step"]) for s in snaps] == [(s["level"], s["step"]) for s in state["snapshots"]]
    assert all(s["ppl"] > 1 for s in snaps)
    taught = {ln["teacher_level"] for ln in lines if ln["phase"] == "prune"}
    assert taught - {0} <= {s["level"] for s in snaps}


def test_plan_from_config_json_alone(tmp_path, monkeypatch, capsys):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights, no tokenizer
    monkeypatch.setattr(checkpoint, "load", lambda *a, **kw: pytest.fail("--plan loaded weights"))
    npr.main(["--ckpt", str(tmp_path), "--target", "0.5", "--plan", "--dtype", "bf16", "--grad-ckpt"])
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "GB per device" in out and "8 GPUs" in out
    plan = memory_plan.memory_plan(llama.LlamaConfig.from_hf(cfg), 2, ("q_proj", "v_proj"), 8, 49, 4, 512, True, True, "pkd", 2)
    row = next(ln for ln in out.splitlines() if ln.startswith("device total")).split()
    assert float(row[3]) == pytest.approx(plan["device total"], abs=0.006)  # the 2-GPU column
    # host RAM per node: a converted layer and the root per rank at load (none in one process: straight to the GPU)
    layer = 4096 * 4 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    root = 2 * 32000 * 4096 + 4096
    load = next(ln for ln in out.splitlines() if ln.strip().startswith("load")).split()[1:]
    assert [float(x) for x in load] == pytest.approx([0.0] + [w * (layer + root) * 2 / 1e9 for w in (2, 4, 8)],
                                                     abs=0.006)
    assert not (tmp_path / "out").exists() and not (ROOT / "out").exists()
    # by phase, every phase of a run to report.json; the peak per device is the largest of them
    lines = out.splitlines()
    phases = lines[lines.index("by phase: GB per device / host GB per node") + 1:]
    names = [ln[:40].strip() for ln in phases[:4]]
    assert names == ["load", "pruning", "export (rank 0)", "report (rank 0)"]
    device = [[float(cell.split("/")[0]) for cell in ln[40:].split("  ") if "/" in cell] for ln in phases[:4]]
    peak = next(ln for ln in lines if ln.startswith("peak per device")).split()[-4:]
    assert [float(x) for x in peak] == pytest.approx([max(col) for col in zip(*device)], abs=0.06)
    assert device[1][1] == pytest.approx(plan["device total"], abs=0.06)  # pruning, 2 GPUs
    kept = (6.74e9 - root) / 2 + root  # report: the pruned model (at most) on rank 0's device, the run's freed
    logits = 4 * 512 * 32000 * (2 + 8)  # one micro-batch's logits and their fp32 log_softmax
    assert device[3][1] == pytest.approx((kept * 2 + logits) / 1e9, abs=0.06)


def test_plan_with_post_finetuning_counts_the_switch(tmp_path, capsys):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "alpaca.json").write_text("[]")
    npr.main(["--ckpt", str(tmp_path), "--target", "0.5", "--plan", "--dtype", "bf16", "--grad-ckpt", "--ft-data",
              str(tmp_path / "alpaca.json")])
    lines = capsys.readouterr().out.splitlines()
    rows = {ln[:40].strip(): [float(c.split("/")[0]) for c in ln[40:].split("  ") if "/" in c]
            for ln in lines[lines.index("by phase: GB per device / host GB per node") + 1:][:6]}
    # the pruning model's shards are freed before the reloaded base is sharded: never two bases on a device
    assert all(rows["load"][w] <= rows["switch to post fine-tuning"][w] < rows["pruning"][w] for w in range(4))
    assert rows["switch to post fine-tuning"][1] < 2 * rows["load"][1]
