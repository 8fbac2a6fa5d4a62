"""experiments/lmeval_parity.py without lm-eval: the shipped task files ask lm-eval for evaluate.py's prompts, and the
per-item comparison counts what differs. The lm-eval run itself is the script's (docs/evaluation.md)."""
import ast
import sys

import pytest

import evaluate
from conftest import ROOT, need

sys.path.insert(0, str(ROOT / "experiments"))
import lmeval_parity as lp  # noqa: E402

TEMPLATE_TASKS = ("boolq", "piqa", "arc_easy", "arc_challenge", "openbookqa")


@pytest.mark.parametrize("task", TEMPLATE_TASKS)
def test_task_files_render_the_prompts_evaluate_scores(task):
    cfg = lp.task_config(task)
    items = evaluate.read_jsonl(need("tasks", f"{task}.jsonl"), 25)
    for item in items:
        doc = evaluate.build_doc(task, item)
        assert lp.render(cfg, item) == (doc.contexts, doc.continuations, doc.gold), item


def test_every_task_file_reads_its_local_file_under_its_own_name():
    for task in evaluate.ZERO_SHOT:
        cfg = lp.task_config(task)
        assert cfg["task"] == f"{task}_offline" and cfg["dataset_path"] == "json"
        assert lp.data_file(cfg) == f"../shared/data/tasks/{task}.jsonl"
        assert cfg["output_type"] == "multiple_choice"
        assert [m["metric"] for m in cfg["metric_list"]] == (["acc"] if task in ("boolq", "winogrande") else
                                                             ["acc", "acc_norm"])
    group = lp._read_yaml(lp.TASKS_DIR / "zeroshot_offline.yaml")
    assert group["task"] == [f"{t}_offline" for t in evaluate.ZERO_SHOT]


def test_hellaswag_and_winogrande_use_lm_evals_own_functions():
    assert lp.task_config("hellaswag")["process_docs"] == "utils.process_docs"
    assert {k: lp.task_config("winogrande")[k] for k in ("doc_to_text", "doc_to_target", "doc_to_choice")} == \
        {k: f"utils.{k}" for k in ("doc_to_text", "doc_to_target", "doc_to_choice")}
    imported = {(n.module, a.name) for n in ast.parse((lp.TASKS_DIR / "utils.py").read_text()).body
                if isinstance(n, ast.ImportFrom) for a in n.names}
    wino = "lm_eval.tasks.winogrande.preprocess_winogrande"
    assert imported == {("lm_eval.tasks.hellaswag.utils", "process_docs")} | {
        (wino, f) for f in ("doc_to_text", "doc_to_target", "doc_to_choice")}
    with pytest.raises(ValueError, match="only lm-eval renders it"):
        lp.render(lp.task_config("hellaswag"), {})


def sample(doc_id, doc, lls, acc, acc_norm=None):
    s = {"doc_id": doc_id, "resps": [[[str(x), "False"]] for x in lls], "acc": acc,
         "arguments": {f"gen_args_{i}": {"arg_0": c, "arg_1": t} for i, (c, t) in enumerate(zip(doc.contexts,
                                                                                                   doc.continuations))}}
    return s if acc_norm is None else {**s, "acc_norm": acc_norm}


def test_the_comparison_counts_moved_choices_prompts_and_golds():
    item = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "x", "label": 0}
    doc = evaluate.build_doc("piqa", item)  # gold 0; choices of 13 and 1 characters: acc_norm picks the gold here
    reqs = [evaluate.Request(doc, [])] * 3
    ours = [[-5.0, -6.0], [-5.0, -6.0], [-5.0, -6.0]]
    same = sample(0, doc, [-5.0, -6.0], 1.0, 1.0)
    moved = sample(1, doc, [-6.5, -6.0], 0.0, 1.0)  # lm-eval's acc pick is "x"; -6.5 / 13 still wins acc_norm
    other = sample(2, doc, [-5.0, -6.0], 1.0, 1.0)
    other["arguments"]["gen_args_1"]["arg_1"] = " y"
    r = lp.compare_task("piqa", [same, moved, other], reqs, ours)
    assert r["lm_eval"] == {"acc": 2 / 3, "acc_norm": 1.0} and r["evaluate"] == {"acc": 1.0, "acc_norm": 1.0}
    counts = ("acc_choice_differs", "acc_norm_choice_differs", "prompt_differs", "gold_differs")
    assert [r[k] for k in counts] == [1, 0, 1, 0]
    assert r["max_abs_loglik_diff"] == 1.5 and [d["doc_id"] for d in r["differing"]] == [1, 2]
    wrong_gold = sample(0, doc, [-5.0, -6.0], 0.0, 1.0)  # lm-eval marked evaluate.py's right answer wrong
    assert lp.compare_task("piqa", [wrong_gold], reqs[:1], ours[:1])["gold_differs"] == 1
    assert "| piqa | 3 | 66.7 | 100.0 | 100.0 | 100.0 | 1 / 0 | 1 / 0 | 1.5e+00 |" in lp.table({"piqa": r})


def test_user_errors_are_one_line(tmp_path, capsys):
    assert lp.main([str(tmp_path), "--tasks", "piqa"]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert lp.main([str(tmp_path), "--tasks", "piqa,mmlu"]) == 2
    assert "valid tasks are" in capsys.readouterr().err
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.jsonl").write_text("{}\n")
    assert lp.main([str(tmp_path), "--tasks", "piqa", "--data-dir", str(tmp_path), "--lm-eval-python", "false"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line: pip install "lm-eval..." or --lm-eval-python
