"""experiments/pkd.py (issue 12): argument handling, job order, the log summaries and the tables, on fake runs."""
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import pkd  # noqa: E402
import plots  # noqa: E402


def fake_log():
    """A pkd run of 6 steps: intact teacher, then snapshots at levels 1 and 2 (stage 1), eval lines every 3 steps."""
    log = []
    for step, lvl, ts in ((1, 0, 0.0), (2, 0, 0.0), (3, 1, 0.01), (4, 1, 0.01), (5, 2, 0.02), (6, 0, 0.0)):
        log.append({"phase": "prune", "step": step, "expected_sparsity": step / 10, "teacher_level": lvl,
                    "teacher_sparsity": ts})
        if step in (1, 2):
            log.append({"phase": "snapshot", "step": step, "level": step, "sparsity": step / 100 + 0.001,
                        "ppl": 4.0 + step})
        if step % 3 == 0:
            log.append({"phase": "eval", "step": step, "expected_sparsity": step / 10, "student_ppl": 10.0 + step})
    return log


def rec(regime, setting, seed, ppl, snaps=()):
    return {"regime": regime, "setting": setting, "seed": seed, "ppl": ppl, "ppl_blocks": ppl - 1, "steps": 100,
            "sparsity": 0.5, "stage2_start": 40, "ppl_before": 4.0, "snapshots": list(snaps), "wall_s": 60.0,
            "cpu_s": 55.0, "evals": [], "teachers": []}


def test_defaults_and_bad_arguments():
    a = pkd.parse_args([])
    assert a.regimes == ["stories260k", "demo"] and a.seeds == [0, 1, 2] and a.settings == list(pkd.SETTINGS)
    for bad in (["--regimes", "llama"], ["--seeds", ""], ["--seeds", "a"], ["--settings", "pkd,xx"],
                ["--budget-min", "-1"], ["--steps-demo", "0"], ["--target", "1.5"]):
        with pytest.raises(ValueError):
            pkd.parse_args(bad)


def test_plan_puts_the_distillation_comparison_first_seed_by_seed():
    jobs = pkd.plan(pkd.parse_args(["--seeds", "0,1"]))
    assert jobs[:6] == [("run", "stories260k", s, seed) for seed in (0, 1) for s in ("pkd", "kd", "none")]
    assert jobs[6] == ("build", "demo")
    assert jobs[7:13] == [("run", "demo", s, seed) for seed in (0, 1) for s in ("pkd", "kd", "none")]
    assert {j[2] for j in jobs[13:]} == {"gap5", "gap20", "interval10"} and len(jobs) == 19
    only = pkd.plan(pkd.parse_args(["--regimes", "demo", "--settings", "pkd,gap5", "--seeds", "3"]))
    assert only == [("build", "demo"), ("run", "demo", "pkd", 3), ("run", "demo", "gap5", 3)]


def test_every_run_gets_the_shared_flags_and_its_own():
    a = pkd.parse_args(["--lr-mask", "0.1", "--lr-lambda", "0.1"])
    f = pkd.run_flags(a, "stories260k")
    assert f[f.index("--lr-mask") + 1] == "0.1" and f[f.index("--log-every") + 1] == "1"
    assert f[f.index("--epochs") + 1] == "7" and f[f.index("--warmup-epochs") + 1] == "1"
    assert pkd.SETTINGS["kd"].flags == ("--distill", "kd") and pkd.SETTINGS["pkd"].flags == ()


def test_log_summaries():
    log = fake_log()
    assert pkd.teacher_schedule(log) == [[1, 0, 0.0], [3, 1, 0.01], [5, 2, 0.02], [6, 0, 0.0]]
    s = pkd.summarize_log(log)
    assert [x["step"] for x in s["snapshots"]] == [1, 2] and [x["step"] for x in s["evals"]] == [3, 6]
    assert pkd.snapshot_ratio(s["snapshots"], 0.02, 4.0) == (6.0 / 4.0, 2)
    assert pkd.snapshot_ratio(s["snapshots"], 0.1, 4.0) is None


def test_teacher_series_gives_the_teacher_in_use_its_perplexity():
    s = plots.teacher_series(fake_log(), 4.0)
    assert s["step"] == [1, 2, 3, 4, 5, 6]
    assert s["teacher_ppl"] == [4.0, 4.0, 5.0, 5.0, 6.0, 4.0]  # intact, snapshot 1, snapshot 2, intact again
    assert s["eval_step"] == [3, 6] and s["student_ppl"] == [13.0, 16.0]
    assert plots.teacher_series(fake_log(), 4.0, "none")["teacher_ppl"] == [None] * 6


def test_verdict_judges_against_the_seed_std():
    kd_better = [rec("r", "pkd", s, 35 + s) for s in range(3)] + [rec("r", "kd", s, 30 + s) for s in range(3)]
    assert "**not reproduced**" in pkd.verdict(kd_better, "r")
    pkd_better = [rec("r", "pkd", s, 20 + s) for s in range(3)] + [rec("r", "kd", s, 30 + s) for s in range(3)]
    assert "**reproduced**" in pkd.verdict(pkd_better, "r")
    close = [rec("r", "pkd", s, 30 + s) for s in range(3)] + [rec("r", "kd", s, 30.5 + s) for s in range(3)]
    assert "within the seed std" in pkd.verdict(close, "r")
    assert "one seed" in pkd.verdict([rec("r", "pkd", 0, 30), rec("r", "kd", 0, 31)], "r")
    assert "not run yet" in pkd.verdict([], "r")


def test_markdown_tables_with_mean_std_and_what_did_not_run():
    a = pkd.parse_args(["--seeds", "0,1"])
    snaps = [{"step": 10 * k, "level": k, "sparsity": k / 100, "ppl": 4.0 + k / 10} for k in range(1, 45)]
    results = [rec("stories260k", s, seed, p + seed, snaps) for s, p in (("pkd", 35.0), ("kd", 31.0), ("none", 36.0))
               for seed in (0, 1)]
    info = {"argv": ["--seeds", "0,1"], "built": [], "timing": {"wall_s": 600, "invocations": 2},
            "regimes": {"stories260k": {"about": "the model", "dense_ppl": 5.21}},
            "oneshot": {"stories260k": {"dense": 5.0, "0.1": 10.0, "0.3": 50.0, "0.5": 300.0}}}
    md = pkd.markdown(results, a, info)
    assert "| PKD: progressive teachers (gap 10%, interval 1%) | 35.50 ± 0.71 | 35.00, 36.00 | 0, 1 |" in md
    assert "| KD: the intact model teaches | 31.50 ± 0.71 |" in md
    assert "**not reproduced**" in md
    assert "1.25 ± 0.00× (100 ± 0 / 100)" in md  # the 10% snapshot: ppl 5.0 / intact 4.0, taken at step 100
    assert "2.00× / 10.00× / 60.00×" in md
    assert "- demo: model build" in md and "- demo gap20 seed 1" in md and "- stories260k pkd seed 0" not in md
    assert "| PKD, gap 5% | not run |" in md


def test_ablation_verdicts_and_precision_near_one():
    res = [rec("demo", "pkd", s, 1.452 + s / 1000) for s in range(3)]
    res += [rec("demo", "gap5", s, 1.478 + s / 1000) for s in range(3)]
    res += [rec("demo", "gap20", s, 1.442 + s / 1000) for s in range(3)]
    v = pkd.ablation_verdicts(res, "demo")
    assert v[0].startswith("PKD, gap 5%: 1.479 vs 1.453") and "beyond" in v[0] and "defaults better" in v[0]
    assert v[1].startswith("PKD, gap 20%: 1.443") and "defaults not better" in v[1] and len(v) == 2
    assert pkd.digits([1.4, 2.9]) == 3 and pkd.digits([1.4, 27.0]) == 2


def test_code_id_hashes_every_top_level_module_and_the_named_files(tmp_path):
    """A run's provenance covers every module it can import (runner.py, rounding.py, ... not a hand-kept list), the
    experiment files named, and the commit of a frozen copy."""
    for f in ("nuteprune.py", "runner.py", "experiments/pkd.py", "experiments/other.py", "README.md"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text(f)
    (tmp_path / ".commit").write_text("abc\n")
    a = pkd.parse_args(["--code", str(tmp_path)])
    ids = pkd.code_id(a)
    assert set(ids) == {"nuteprune.py", "runner.py", "experiments/pkd.py", "commit"} and ids["commit"] == "abc"
    assert set(pkd.code_id(a, ("experiments/other.py",))) == {"nuteprune.py", "runner.py", "experiments/other.py",
                                                                "commit"}
    (tmp_path / "runner.py").write_text("changed")
    assert pkd.code_id(a)["runner.py"] != ids["runner.py"] and pkd.code_id(a)["nuteprune.py"] == ids["nuteprune.py"]


def test_runs_get_paths_relative_to_the_repository():
    """nuteprune.py runs in the repository folder and report.json records its flags as given, so results.json, which
    copies them, names ../shared/... and runs/..., whatever --data-dir and --out the command was given."""
    a = pkd.parse_args(["--data-dir", str(ROOT.parent / "shared" / "data"), "--out", str(ROOT / "runs" / "pkd")])
    ctx = pkd.Ctx(a, Path(a.out), None)
    d = ROOT.parent / "shared" / "data" / "stories260K"
    p = {"ckpt": str(d / "stories260K.bin"), "tokenizer": str(d / "tok512.model"),
         "data": str(ctx.out / "stories260k" / "calibration.txt"), "heldout": str(ctx.out / "stories260k" / "h.txt")}
    cmd = pkd.nuteprune_cmd(ctx, "stories260k", p, "pkd", 0, ctx.out / "stories260k" / "runs" / "pkd-s0")
    flag = {k: cmd[cmd.index(k) + 1] for k in ("--ckpt", "--tokenizer", "--data", "--heldout", "--out", "--cache-dir")}
    assert flag["--ckpt"] == "../shared/data/stories260K/stories260K.bin"
    assert flag["--tokenizer"] == "../shared/data/stories260K/tok512.model"
    assert flag["--data"] == "runs/pkd/stories260k/calibration.txt"
    assert flag["--out"] == "runs/pkd/stories260k/runs/pkd-s0" and flag["--cache-dir"] == "runs/pkd/stories260k/cache"
