import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import demo

TINY = demo.DemoConfig(train_docs=200, heldout_docs=20, vocab_size=200, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_dim=64, seq_len=64, batch_size=8, steps=60, lr=1e-2, threads=1)  # 1: fast even on a busy CPU


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_stories_are_deterministic_and_splits_disjoint():
    train = demo.stories(300, seed=1)
    assert train == demo.stories(300, seed=1)
    assert train != demo.stories(300, seed=2)
    heldout = demo.stories(50, seed=2, exclude=set(train))
    assert not set(train) & set(heldout)
    for s in train:
        assert "\n" not in s and s.endswith("The end.")


def test_stories_are_consistent():
    # the structure the model is meant to learn holds in every story: sums, counts, pronouns
    num = {w: i for i, w in enumerate(demo.NUMBERS)}
    for s in demo.stories(300, seed=3):
        m = re.search(r"(\w+) had (\w+) \w+\. .* gave (\w+) \w+ to \w+\. Now \1 had (\w+)", s)
        if m:
            assert num[m[2]] - num[m[3]] == num[m[4]]
        m = re.search(r'"(One[\w, ]*)!" said \w+\. There were (\w+)', s)
        if m:
            assert len(m[1].split(", ")) == num[m[2]]
        m = re.match(r"[\w ]+, there was a little (\w+) named (\w+)\. (He|She) ", s)
        assert m and (m[3] == "She") == (m[2] in demo.GIRLS)


def test_tiny_build_trains_saves_and_is_cached(tmp_path):
    folder, logs = tmp_path / "demo", []
    paths = demo.ensure_demo(folder, log=logs.append, cfg=TINY)
    assert any("held-out loss" in line for line in logs)
    stats = json.loads((folder / "demo.json").read_text())["stats"]
    assert stats["train_loss"] < stats["first_loss"] - 1.0
    assert stats["heldout_loss"] < stats["unigram_loss"]

    # the texts are blank-line-separated documents, the held-out ones unseen in training
    train, heldout = demo.read_docs(paths["train_text"]), demo.read_docs(paths["heldout_text"])
    assert (len(train), len(heldout)) == (TINY.train_docs, TINY.heldout_docs)
    assert not set(train) & set(heldout)

    # what was saved is the trained model: its held-out loss is the one the build measured
    model, tok = checkpoint.load(paths["ckpt"])
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.vocab_size == model.config.vocab_size
    assert model.config.n_kv_heads < model.config.n_heads  # grouped-query attention
    ids = demo.token_stream(tok, heldout)
    assert demo.mean_loss(model, ids, TINY.seq_len) == pytest.approx(stats["heldout_loss"], abs=1e-4)
    assert tok.decode(tok.encode(heldout[0])) == heldout[0]

    # a second call reuses the build; a corrupt file makes the next call rebuild the same model
    assert demo.read_manifest(folder, demo.DemoConfig()) is None  # built for another config: not reused
    logs.clear()
    weights = sha(folder / "model.safetensors")
    assert demo.ensure_demo(folder, log=logs.append, cfg=TINY) == paths and not logs
    (folder / "model.safetensors").write_bytes(b"truncated")
    demo.ensure_demo(folder, log=logs.append, cfg=TINY)
    assert logs and sha(folder / "model.safetensors") == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary directories left behind


def test_manifest_rejects_missing_or_malformed_builds(tmp_path):
    assert demo.read_manifest(tmp_path, TINY) is None  # nothing built
    (tmp_path / "demo.json").write_text("{not json")
    assert demo.read_manifest(tmp_path, TINY) is None
    manifest = {"version": demo.VERSION, "config": dataclasses.asdict(TINY), "sha256": {}}
    (tmp_path / "demo.json").write_text(json.dumps(manifest))
    assert demo.read_manifest(tmp_path, TINY) is None  # files missing


def test_cache_dir_follows_nuteprune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUTEPRUNE_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "demo"


# -- reproducible builds (issue 14): nothing of the environment reaches the files ------------------------------------

ROOT = Path(__file__).resolve().parents[1]
BUILD = """
import sys, demo, json, os
os.umask(0o022)
cfg = demo.DemoConfig(**json.loads(sys.argv[2]))
demo.ensure_demo(sys.argv[1], log=lambda m: None, cfg=cfg)
"""


def test_build_is_the_same_whatever_the_hash_seed_and_threads(tmp_path):
    """Two builds from empty caches, in processes with different PYTHONHASHSEED and OMP_NUM_THREADS, training on one
    and on two threads (the two build_threads picks), write byte-identical files (the corpus, the tokenizer, the
    trained model)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for i, (seed, threads) in enumerate([("1", "1"), ("2", "2")]):
        small = dataclasses.replace(TINY, steps=20, threads=int(threads))
        subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / f"c{i}" / "demo"),
                        json.dumps(dataclasses.asdict(small))], check=True, cwd=ROOT, timeout=300,
                       env={**env, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)})
    for f in demo.FILES:
        assert sha(tmp_path / "c0" / "demo" / f) == sha(tmp_path / "c1" / "demo" / f), f
    # the cache is readable by others under a 022 umask (the build folder is made by mkdtemp, 0700)
    for f in ("", "train.txt", "heldout.txt", "demo.json"):
        mode = (tmp_path / "c0" / "demo" / f).stat().st_mode & 0o777
        assert mode == (0o755 if f == "" else 0o644), (f, oct(mode))


def test_build_trains_on_exactly_its_threads(tmp_path, monkeypatch):
    """The caller's thread setting neither reaches the training (more or fewer threads) nor is lost after it; with
    threads=0 the machine's load picks 2 (idle) or 1 (busy)."""
    seen = []

    class Stop(Exception):
        pass

    def train_model(cfg, train, vocab, log):
        seen.append(torch.get_num_threads())
        raise Stop  # the build stops here: the threads are all this test wants

    monkeypatch.setattr(demo, "train_model", train_model)
    before = torch.get_num_threads()
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            for threads, busy in ((1, 0.0), (0, 0.0), (0, 1.5)):
                monkeypatch.setattr(demo.cli, "busy_cores", lambda: busy)
                with pytest.raises(Stop):
                    demo.build_demo(tmp_path, dataclasses.replace(TINY, train_docs=50, threads=threads),
                                    log=lambda m: None)
                assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    two = 2 if (os.cpu_count() or 1) >= 2 else 1
    assert seen == [1, two, 1] * 2 and demo.DemoConfig().threads == 0

# -- interrupted builds ----------------------------------------------------------------------------------------------


def test_killed_build_is_cleaned_up_by_the_next_call(tmp_path, monkeypatch):
    """A build killed mid-way leaves its work folder; the next ensure_demo removes it (its process is gone) and every
    folder that may belong to a live build stays."""
    folder = tmp_path / "demo"
    kill = ("import os, signal, demo\n"
            "demo.build_demo = lambda out, cfg, log: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"demo.ensure_demo({str(folder)!r}, log=lambda m: None)\n")
    proc = subprocess.Popen([sys.executable, "-c", kill], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    (dead,) = tmp_path.iterdir()
    assert dead.name.startswith(f".demo-build-{demo._host()}-{proc.pid}-")
    old = tmp_path / f".demo-old-{demo._host()}-{proc.pid}-abcd1234"  # killed while replacing a corrupt build
    old.mkdir()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        day = time.time() - 2 * demo.STALE_UNKNOWN_S
        keep = [tmp_path / f".demo-build-{demo._host()}-{live.pid}-abcd1234",  # a concurrent live build
                tmp_path / f".demo-build-{demo._host()}-{os.getpid()}-abcd1234",  # this process's own
                tmp_path / f".demo-build-otherhost-{proc.pid}-abcd1234",  # another host's, recent: may be live
                tmp_path / ".demo-build-abcd1234",  # an older version's name, recent
                tmp_path / f".demo2-build-{demo._host()}-{proc.pid}-abcd1234",  # another cache's
                tmp_path / "demo-build-notours"]
        gone = [dead, old, tmp_path / f".demo-build-otherhost-{proc.pid}-abcd1235",  # another host's, two days old
                tmp_path / ".demo-build-abcd1235"]  # an older version's, two days old
        for p in keep + gone[2:]:
            p.mkdir()
        for p in gone[2:]:
            os.utime(p, (day, day))
        logs = []
        monkeypatch.setattr(demo, "read_manifest", lambda folder, cfg: {"ok": True})  # a valid build: no new one
        assert demo.ensure_demo(folder, log=logs.append) == demo._paths(folder)
        assert sorted(p for p in tmp_path.iterdir()) == sorted(keep)
        assert len(logs) == 1 and "removed 4 folder(s) left by interrupted builds" in logs[0]
    finally:
        live.kill()
        live.wait()
    assert demo.remove_stale_builds(folder) == [keep[0]]  # its process has ended now
