import dataclasses
import hashlib
import json
import re

import pytest

import demo
import llama

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
    model, tok = llama.load(paths["ckpt"])
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
