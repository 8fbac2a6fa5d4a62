"""experiments/smollm2.py (issue 19) on a tiny model: the grid's order and commands, the one-shot Taylor masks on the
target, a whole grid that stops at its budget and resumes without redoing finished work, --report-only, the
table with every row; and experiments/baselines.py's run continuing after a signal exactly as without one."""
import contextlib
import io
import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import llama
from conftest import ROOT, WORDS, files  # noqa: F401  (the session fixture)

sys.path.insert(0, str(ROOT / "experiments"))
import baselines  # noqa: E402
import smollm2  # noqa: E402

SMOLLM2 = llama.LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                            tie_embeddings=True)


def test_plan_puts_the_cheap_rows_first_and_every_row_has_two_seeds():
    a = smollm2.parse_args([])
    names = [j.name for j in smollm2.plan(a)]
    rows = ["minitron", "taylor", "pkd-m", "kd-m", "pkd", "kd"]
    assert names == ["dense"] + [f"{m}-{t}-s{s}" for s in (0, 1) for t in (50, 20) for m in rows] + [
        "pkd-m-20-s0-x4", "minitron-20-s0-x4", "dense-full"]
    assert [j.name for j in smollm2.plan(smollm2.parse_args(["--seeds", "3", "--scaled", ""]))][-2:] == \
        ["kd-20-s3", "dense-full"]
    for bad in (["--steps", "0"], ["--seeds", ""], ["--seeds", "x"], ["--limit", "-1"], ["--scaled", "magnitude"],
                ["--only", "pkd-50-s9"], ["--scale", "0"]):
        with pytest.raises(ValueError):
            smollm2.parse_args(bad)


def test_nuteprune_and_the_baselines_get_the_same_tokens_steps_and_precision(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:  # the commands name the shared model and data files, which must exist
        a = smollm2.parse_args(["--steps", "77", "--batch-size", "3", "--block-size", "64"])
        smollm2.paths(a)
    except ValueError as e:
        pytest.skip(str(e))
    jobs = {j.name: j for j in smollm2.plan(a)}
    run = tmp_path / "run"
    run.mkdir()
    n = smollm2.nuteprune_cmd(a, jobs["kd-50-s0"], run)
    b = smollm2.baseline_cmd(a, jobs["taylor-20-s1"], run)
    for flag, value in (("--batch-size", "3"), ("--block-size", "64"), ("--heldout-blocks", "16"),
                        ("--dtype", "bf16")):
        assert n[n.index(flag) + 1] == b[b.index(flag) + 1] == value
    assert n[n.index("--max-steps") + 1] == b[b.index("--steps") + 1] == "77"
    assert n[n.index("--distill") + 1] == "kd" and "--recipe" not in n and b[b.index("--loss") + 1] == "ce"
    m = smollm2.nuteprune_cmd(a, jobs["pkd-m-20-s0-x4"], run)
    assert m[m.index("--recipe") + 1] == "modern" and m[m.index("--max-steps") + 1] == str(4 * 77)
    assert "--distill" not in m and m[m.index("--seed") + 1] == "0"
    mini = smollm2.baseline_cmd(a, jobs["minitron-20-s0-x4"], run)
    assert mini[mini.index("--loss") + 1] == "kd" and mini[mini.index("--steps") + 1] == str(4 * 77)
    # recorded as typed in the repository folder: no path of this machine
    for cmd in (n, b, m, mini, smollm2.eval_cmds(a, run / "pruned", str(run / "eval"))[0][1]):
        assert cmd[:2] in (["python", "nuteprune.py"], ["python", "experiments/baselines.py"],
                           ["python", "evaluate.py"])
        assert not any(x.startswith("/") for x in cmd), cmd
        assert "../shared/" in " ".join(cmd)
    (run / "state.pt").write_bytes(b"")
    assert smollm2.nuteprune_cmd(a, jobs["kd-50-s0"], run)[2:3] == ["--resume"]


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_one_shot_taylor_masks_hit_the_target(target):
    # a narrow model with SmolLM2's head layout (9 query heads on 3 K/V heads): Taylor scores from real gradients
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(dim=288, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=32, ffn_dim=768,
                                          vocab_size=64, max_seq_len=64)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(1))
    masks = baselines.prune_masks(model, "taylor", target, blocks)
    pruned = llama.prune_model(model, masks)
    kept = llama.prunable_params(pruned.config)
    assert baselines.kept_prunable(masks, model.config) == kept
    assert abs(1 - kept / llama.prunable_params(model.config) - target) <= 0.005
    # and on SmolLM2's own shapes (any scores: only the counting and the keep-fraction search matter)
    g = torch.Generator().manual_seed(2)
    scores = llama.Masks(torch.rand(30, 9, generator=g), torch.rand(30, 1536, generator=g),
                         torch.rand(576, generator=g))
    m = baselines.masks_for_target(scores, SimpleNamespace(config=SMOLLM2), target)
    assert abs(1 - baselines.kept_prunable(m, SMOLLM2) / llama.prunable_params(SMOLLM2) - target) <= 0.005


def test_minitron_scores_rank_a_massive_dim_first_and_its_masks_hit_the_target():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(dim=288, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=32, ffn_dim=768,
                                          vocab_size=64, max_seq_len=64)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] = 50.0  # a massive activation in hidden dim 7
        model.model.layers[1].mlp.down_proj.weight[:, 5] *= 0.0  # FFN channel 5 of layer 1 writes nothing...
        model.model.layers[1].mlp.up_proj.weight[5] *= 0.0  # ...and is never active: the least important
    blocks = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(1))
    scores = baselines.unit_scores(model, "minitron", blocks)
    assert scores.hidden.argmax() == 7 and scores.intermediate[1].argmin() == 5
    assert scores.head.shape == (2, 9) and (scores.head > 0).all()
    for target in (0.2, 0.5):
        masks = baselines.masks_for_target(scores, model, target)
        assert masks.hidden[7] == 1
        assert abs(1 - baselines.kept_prunable(masks, model.config) / llama.prunable_params(model.config) - target) \
            <= 0.005


class StopAfter:
    """Stands in for runfolder.StopSignals: a SIGTERM "arrives" once `after` optimizer steps have been taken."""

    def __init__(self, after):
        self.after, self.steps = after, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self):
        self.steps += 1
        return signal.SIGTERM if self.steps > self.after else None


def test_a_baseline_run_stopped_by_a_signal_continues_exactly(files, tmp_path, monkeypatch):  # noqa: F811
    import runfolder
    argv = ["--ckpt", str(files / "model"), "--data", str(files / "corpus.txt"), "--method", "magnitude",
            "--target", "0.5", "--steps", "8", "--batch-size", "2", "--block-size", "32", "--heldout-blocks", "4",
            "--cache-dir", str(files / "cache"), "--save-every", "100"]
    whole = baselines.run(baselines.build_parser().parse_args(argv + ["--out", str(tmp_path / "whole")]))
    monkeypatch.setattr(runfolder, "StopSignals", StopAfter(3))
    a = baselines.build_parser().parse_args(argv + ["--out", str(tmp_path / "cut")])
    assert baselines.run(a) is None and (tmp_path / "cut" / "state.pt").is_file()
    monkeypatch.undo()
    again = baselines.run(a)
    assert again["steps"] == 8 and again["ppl_after"] == pytest.approx(whole["ppl_after"], rel=1e-6)
    import safetensors.torch as st
    x, y = (st.load_file(tmp_path / d / "pruned" / "model.safetensors") for d in ("whole", "cut"))
    for k in x:
        torch.testing.assert_close(x[k], y[k], msg=k)


def fake_data(d: Path, files) -> Path:  # noqa: F811
    """shared/data's layout with a few tiny items of every task, the tiny corpus as C4 and its Alpaca file."""
    docs = (files / "corpus.txt").read_text().split("\n\n")
    (d / "c4").mkdir(parents=True)
    (d / "c4" / "c4_en_train00000_first1000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "alpaca").mkdir()
    (d / "alpaca" / "alpaca_data_first200.json").write_text((files / "alpaca.json").read_text())
    text = "\n".join(docs[:40])
    for sub, name in (("wikitext2", "wiki.test.raw"), ("ptb", "ptb.valid.txt")):
        (d / sub).mkdir()
        (d / sub / name).write_text(text)
    w = WORDS
    choices = {"text": [w[0], w[1], w[2], w[3]], "label": ["A", "B", "C", "D"]}
    items = {"boolq": {"question": "is the sun big", "passage": docs[0], "answer": True, "label": 1},
             "piqa": {"goal": "the cat sat", "sol1": "on the tree", "sol2": "in the sun", "label": 0},
             "hellaswag": {"activity_label": "Dog", "ctx_a": "the dog ran", "ctx_b": "then it", "ctx": "the dog ran "
                           "then it", "endings": ["sat.", "jumped.", "ran.", "found a ball."], "label": "1"},
             "winogrande": {"sentence": "the cat saw the dog and _ ran", "option1": "the cat", "option2": "the dog",
                            "answer": "2"},
             "arc_easy": {"id": "1", "question": "what is red", "choices": choices, "answerKey": "B"},
             "arc_challenge": {"id": "1", "question": "what is blue", "choices": choices, "answerKey": "C"},
             "openbookqa": {"id": "1", "question_stem": "the sun is", "choices": choices, "answerKey": "A"}}
    (d / "tasks").mkdir()
    for task, item in items.items():
        (d / "tasks" / f"{task}.jsonl").write_text(json.dumps(item) + "\n" + json.dumps(item) + "\n")
    return d


def in_process(calls: list):
    """pkd.supervise's stand-in: runs nuteprune.py, baselines.py and evaluate.py in this process (fast)."""
    import evaluate
    import nuteprune

    def supervise(ctx, cmd, run, env=None):
        script = Path(cmd[1]).name
        calls.append((script, cmd[cmd.index("--json") + 1] if "--json" in cmd else cmd[cmd.index("--out") + 1]
                      if "--out" in cmd else cmd[-1]))
        main = {"nuteprune.py": nuteprune.main, "baselines.py": baselines.main, "evaluate.py": evaluate.main}[script]
        code = 0
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(cmd[2:])
            except SystemExit as e:
                code = e.code or 0
        return code << 8, SimpleNamespace(ru_utime=0.5, ru_stime=0.0), False  # a wait status
    return supervise


def test_the_grid_stops_at_its_budget_resumes_and_reports_every_row(files, tmp_path, monkeypatch):  # noqa: F811
    import pkd
    monkeypatch.chdir(ROOT)  # where the grid runs its commands
    data = fake_data(tmp_path / "data", files)
    argv = ["--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--model", str(files / "model"),
            "--data-dir", str(data), "--steps", "6", "--batch-size", "2", "--block-size", "32", "--heldout-blocks",
            "4", "--lr-mask", "1", "--lr-lambda", "1", "--eval-every", "3", "--limit", "2", "--ppl-windows", "2",
            "--seq-len", "16", "--dtype", "fp32", "--scale", "2", "--scaled", "minitron"]
    calls = []
    monkeypatch.setattr(pkd, "supervise", in_process(calls))
    monkeypatch.setattr(pkd.Ctx, "late", lambda self: len(calls) >= 8)  # the budget ends after 8 subprocesses
    first = smollm2.main_run(smollm2.parse_args(argv + ["--budget-min", "1"]))
    assert len(calls) == 8 and {r["row"] for r in first} == {"dense", "minitron-50-s0", "taylor-50-s0"}
    md = (tmp_path / "results" / "results.md").read_text()
    assert "Not run yet" in md and "- kd-20-s1" in md
    monkeypatch.setattr(pkd.Ctx, "late", lambda self: False)
    done = list(calls)
    rows = smollm2.main_run(smollm2.parse_args(argv))
    assert not set(calls[len(done):]) & set(done)  # nothing finished was redone
    assert {r["row"] for r in rows} == {j.name for j in smollm2.plan(smollm2.parse_args(argv)) if j.kind != "full"}
    for r in rows:
        if r["kind"] == "nuteprune":  # on target (the baselines' uniform widths are coarse on a model this small)
            assert abs(r["sparsity"] - r["target"]) <= 0.005
            assert r["controller"] and r["trace"][-1][0] == 6 * r["scale"]
    md = (tmp_path / "results" / "results.md").read_text()
    for label in smollm2.LABELS.values():
        assert f"| {label} |" in md
    assert "| 20% | Minitron-style one-shot + KD LoRA, 2× tokens |" in md
    assert "Every planned job has run." in md and (tmp_path / "results" / "smollm2.png").is_file()
    assert (tmp_path / "results" / "controller.png").is_file() and "## The controller" in md
    assert "| 50% | NutePrune PKD, modern recipe | LoRA while pruning | 0, 1 |" in md  # two seeds: mean ± std
    recorded = [c for r in json.loads((tmp_path / "results" / "results.json").read_text())["rows"]
                for c in r["commands"]]
    assert recorded and not [c for c in recorded if any(x.startswith("/") for x in c.split())]  # relative paths
    n = len(calls)
    smollm2.main_run(smollm2.parse_args(argv + ["--report-only"]))
    assert len(calls) == n and (tmp_path / "results" / "results.md").read_text().split("## Closing")[0] == \
        md.split("## Closing")[0]


def test_invocations_are_recorded_without_the_code_copys_folder():
    assert smollm2.recorded(["--out", "runs/smollm2", "--code", "/tmp/gridcode", "--only", "dense"]) == \
        ["--out", "runs/smollm2", "--code", "COPY", "--only", "dense"]
