"""Never lose a run: no silent overwrite, one process per folder, graceful stop on SIGTERM / SIGINT, resume flags,
honest warnings when the masks were forced, and bad input answered before any work."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import nuteprune as npr
from conftest import ROOT, args


def run_main(argv, capsys):
    """(exit code, stderr lines) of nuteprune.main(argv)."""
    capsys.readouterr()
    code = 0
    try:
        npr.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def killed_at(step: int, argv: list[str]) -> None:
    """nuteprune.main(argv) killed by an exception at the start of pruning step `step` (after its checkpoints)."""
    class Killed(Exception):
        pass
    target_at = npr.target_at
    npr.target_at = lambda s, *a: (_ for _ in ()).throw(Killed()) if s == step else target_at(s, *a)
    try:
        with pytest.raises(Killed):
            npr.main(argv)
    finally:
        npr.target_at = target_at


def fingerprint(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_identical_command_refuses_and_leaves_the_run_untouched(files, tmp_path, capsys):
    out = tmp_path / "run"
    npr.main(args(files, out, "--max-steps", "4"))
    before = fingerprint(out)
    code, err = run_main(args(files, out, "--max-steps", "4"), capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert fingerprint(out) == before  # state.pt, log.jsonl, report.json, pruned/ byte-identical
    npr.main(args(files, out, "--max-steps", "6", "--overwrite"))  # --overwrite starts over
    assert json.loads((out / "report.json").read_text())["steps"] == 6


def test_a_locked_folder_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as f:  # another process (here: this one, on another descriptor) holds the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_main(args(files, out, "--max-steps", "2"), capsys)
    assert code == 2 and len(err) == 1 and "another nuteprune process" in err[0]
    assert not (out / "state.pt").exists()
    npr.main(args(files, out, "--max-steps", "2"))  # released with its descriptor: no stale lock


def test_sigterm_stops_after_a_checkpoint_and_resume_matches_an_uninterrupted_run(files, tmp_path):
    extra = ("--max-steps", "40", "--log-every", "1", "--save-every", "1000")
    npr.main(args(files, tmp_path / "a", *extra))
    cmd = [sys.executable, str(ROOT / "nuteprune.py"), *args(files, tmp_path / "b", *extra)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:  # one line per step: signal once step 5 is logged, mid-run
        if line.startswith("phase prune | step 5 "):
            p.send_signal(signal.SIGTERM)
            break
    p.stdout.read()
    err = p.stderr.read()
    assert p.wait(60) == 128 + signal.SIGTERM, err
    assert "--resume" in err
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert 5 <= state["step"] < 40 and not (tmp_path / "b" / "report.json").exists()  # saved at a step boundary
    npr.main(["--resume", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / x / "state.pt", weights_only=True) for x in ("a", "b"))
    for group in ("head", "intermediate", "hidden"):
        assert torch.equal(a["final_masks"][group], b["final_masks"][group])
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    model_a, model_b = ((tmp_path / x / "pruned" / "model.safetensors").read_bytes() for x in ("a", "b"))
    assert model_a == model_b
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()


def test_resume_flags(files, tmp_path, capsys):
    out = tmp_path / "run"
    npr.main(args(files, out, "--max-steps", "4"))
    code, err = run_main(["--resume", str(out), "--target", "0.4"], capsys)  # finished; target cannot change anyway
    assert code == 2 and len(err) == 1 and "--target" in err[0] and "cannot change" in err[0]
    code, err = run_main(["--resume", str(out), "--seed", "3"], capsys)
    assert code == 2 and "--seed" in err[0]
    code, err = run_main(["--resume", str(out), "--max-steps", "8"], capsys)  # pruning has ended: nothing to extend
    assert code == 2 and "--max-steps" in err[0]
    # the same value as the run's, or a path written differently, is not a change
    npr.main(["--resume", str(out), "--seed", "0", "--data", os.path.relpath(files / "corpus.txt"), "--log-every", "1"])
    report = json.loads((out / "report.json").read_text())
    assert report["resumes"][-1]["changed"] == {"log_every": [2, 1]} and report["args"]["log_every"] == 1


def test_resume_extends_max_steps(files, tmp_path):
    out = tmp_path / "run"
    npr.main(args(files, tmp_path / "full", "--max-steps", "8"))

    killed_at(4, args(files, out, "--max-steps", "6", "--save-every", "2"))
    npr.main(["--resume", str(out), "--max-steps", "8"])
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 8 and report["resumes"][0]["changed"] == {"max_steps": [6, 8]}


def test_forced_target_warns_in_stdout_and_report(files, tmp_path, capsys):
    out = tmp_path / "run"
    npr.main(args(files, out, "--max-steps", "1", "--target", "0.3", "--lr-mask", "0.1", "--lr-lambda", "0.1"))
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"] - 0.3) <= 0.005  # the target is met ...
    assert report["expected_sparsity_at_end"] < 0.05  # ... by forcing, not by training
    assert sum(report["final_masks_moved"].values()) > 0
    assert report["warning"] and "--lr-lambda" in report["warning"]
    assert [ln for ln in stdout.splitlines() if ln.startswith("warning: ")] == [f"warning: {report['warning']}"]


def test_round_to_wider_than_the_model_warns_and_reports_its_cost(files, tmp_path, capsys):
    out = tmp_path / "run"
    npr.main(args(files, out, "--max-steps", "4", "--round-to", "64"))  # the FFN is 48 wide, hidden 32
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    r = report["rounding"]
    assert abs(report["sparsity"] - 0.5) <= 0.005 and r["round_to"] == 64
    assert r["warning"].startswith("--round-to 64 not met: FFN widths not multiples of 64") and "narrower" in r["warning"]
    assert f"warning: {r['warning']}" in stdout.splitlines()
    assert set(r["units_moved"]) == {"head", "intermediate", "hidden"}
    assert r["ppl_rounded"] > 1 and r["ppl_unrounded"] > 1 and report["args"]["round_to"] == 64


def test_keep_hidden_run_keeps_the_hidden_width_and_resumes_with_it(files, tmp_path):
    out = tmp_path / "run"
    killed_at(3, args(files, out, "--max-steps", "4", "--keep-hidden", "--save-every", "2"))
    npr.main(["--resume", str(out)])  # the saved run's --keep-hidden
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "pruned" / "config.json").read_text())
    state = torch.load(out / "state.pt", weights_only=False)
    assert abs(report["sparsity"] - 0.5) <= 0.005 and report["args"]["keep_hidden"] is True
    assert config["hidden_size"] == 32 and report["final_masks_moved"]["hidden"] == 0
    init = npr.Gates(npr.llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64),
                     torch.Generator().manual_seed(0))
    assert torch.equal(state["gates"]["hidden.log_alpha"], init.hidden.log_alpha.detach())  # never trained
    assert report["resumes"] and state["gates"]["head.log_alpha"].ne(init.head.log_alpha.detach()).any()


def test_masks_that_learned_the_target_carry_no_warning():
    cfg = npr.llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64)
    gates = npr.Gates(cfg)
    with torch.no_grad():  # confident gates: half of the FFN channels off, everything else on
        gates.intermediate.log_alpha[:, ::2] = npr.LOG_ALPHA_MIN
        gates.clamp_()
    target = float(npr.expected_sparsity(gates.deterministic(), cfg))
    c = npr.RunConfig(ckpt="x", target=round(target, 3), data="x")
    fit = npr.mask_fit(gates, npr.final_masks(gates, cfg, c.target), cfg, c)
    assert fit["warning"] is None and abs(fit["expected_sparsity_at_end"] - c.target) < 0.02
    off = npr.RunConfig(ckpt="x", target=round(target + 0.1, 3), data="x")  # 10 points beyond what they learned
    fit = npr.mask_fit(gates, npr.final_masks(gates, cfg, off.target), cfg, off)
    assert fit["warning"] and fit["final_masks_moved"]["intermediate"] > 0


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_checkpoint_is_a_one_line_error_and_nothing_changes(files, tmp_path, capsys, damage):
    out = tmp_path / "run"
    npr.main(args(files, out, "--max-steps", "2"))
    state = out / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        torch.save({"model": torch.zeros(3)}, state)
    before = fingerprint(out)
    code, err = run_main(["--resume", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "state.pt" in err[0]
    assert fingerprint(out) == before


def test_bad_paths_are_answered_before_any_work(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(npr.checkpoint, "load", lambda *a, **kw: pytest.fail("loaded a model before checking the flags"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((files / "model" / "config.json").read_text())
    cases = {
        "is a directory": args(files, tmp_path / "o", "--data", str(tmp_path)),
        "does not exist": args(files, tmp_path / "o", "--data", str(tmp_path / "missing.txt")),
        "is empty": args(files, tmp_path / "o", "--data", str(tmp_path / "empty.txt")),
        "--tokenizer": args(files, tmp_path / "o", "--tokenizer", str(tmp_path / "tok.model")),
        "--out": args(files, tmp_path / "afile"),
        "no weights": args(files, tmp_path / "o", "--ckpt", str(tmp_path / "noweights")),
        "--ft-data": args(files, tmp_path / "o", "--ft-max-steps", "3"),
    }
    for needle, argv in cases.items():
        code, err = run_main(argv, capsys)
        assert code == 2 and len(err) == 1 and needle in err[0], (needle, err)
    assert not (tmp_path / "o").exists()


def test_written_files_are_readable_by_others_under_a_022_umask(files, tmp_path):
    old = os.umask(0o022)
    try:
        npr.main(args(files, tmp_path / "run", "--max-steps", "2"))
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"state.pt", "report.json", "log.jsonl", "model.safetensors", "config.json"} <= {p.name for p in written}
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


def test_cpu_threads_rule(monkeypatch):
    import cli
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("NUTEPRUNE_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cli, "busy_cores", lambda: 1.0)  # another process keeps a core busy
        torch.set_num_threads(2)
        assert cli.cpu_threads(260_000) == 1  # a small model: one thread
        torch.set_num_threads(2)
        assert cli.cpu_threads(7_000_000_000) == 2  # a large one keeps torch's default
        monkeypatch.setattr(cli, "busy_cores", lambda: 0.1)  # an idle machine
        torch.set_num_threads(2)
        assert cli.cpu_threads(260_000) == 2  # every core, small model or not
        monkeypatch.setattr(cli, "busy_cores", lambda: 1.0)
        monkeypatch.setenv("NUTEPRUNE_THREADS", "2")
        assert cli.cpu_threads(260_000) == 2  # the override wins
        monkeypatch.delenv("NUTEPRUNE_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert cli.cpu_threads(260_000) == 2  # so does the user's OMP_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def test_busy_cores_sees_a_busy_process():
    import cli
    idle = cli.busy_cores()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert cli.busy_cores() > min(idle + 0.5, 0.9)  # one more core at work
    finally:
        spin.kill()
        spin.wait()
