"""Hub ids, short names and the default --data resolve from a fake Hugging Face cache built in tmp_path; offline
and not cached is one line naming the fix. Nothing here reaches the network: HF_HUB_OFFLINE is set for every test,
and the download tests replace huggingface_hub's download functions."""
import os
import sys
from pathlib import Path

import pytest

import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    for k in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def fake_repo(cache, repo_id, commit=COMMIT, ref=True, files=("config.json",), kind="models"):
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_text("{}")
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit + "\n")  # the cache writes no newline; tolerate one
    return snap


def one_line_error(fn, *args):
    with pytest.raises(ValueError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_hub_id_resolves_to_its_cached_snapshot(cache):
    snap = fake_repo(cache, "org/name")
    fake_repo(cache, "org/name", commit="f" * 40, ref=False)  # newer, but refs/main names the other one
    assert hub.resolve_checkpoint("org/name") == str(snap)


def test_short_name_maps_to_its_hub_id(cache):
    snap = fake_repo(cache, hub.SHORT_NAMES["smollm2-135m"])
    assert hub.resolve_checkpoint("smollm2-135m") == str(snap)
    assert hub.resolve_checkpoint("SmolLM2-135M") == str(snap)


def test_hf_home_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    snap = fake_repo(tmp_path / "home" / "hub", "org/name")
    assert hub.resolve_checkpoint("org/name") == str(snap)


def test_default_cache_is_under_home(monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.hub_cache_dir() == Path(os.path.expanduser("~/.cache/huggingface/hub"))


def test_without_refs_main_the_newest_snapshot_with_config_is_used(cache):
    partial = fake_repo(cache, "org/name", commit="a" * 40, ref=False, files=("tokenizer.json",))
    old = fake_repo(cache, "org/name", commit="b" * 40, ref=False)
    new = fake_repo(cache, "org/name", commit="c" * 40, ref=False)
    os.utime(old, (1, 1))
    os.utime(partial, None)  # newest of all, but without config.json it cannot be loaded
    assert hub.resolve_checkpoint("org/name") == str(new)


def test_not_cached_offline_is_one_line_naming_id_cache_and_ckpt(cache):
    msg = one_line_error(hub.resolve_checkpoint, "llama-7b")
    assert "huggyllama/llama-7b" in msg and str(cache) in msg and "--ckpt" in msg and "HF_HUB_OFFLINE" in msg
    msg = one_line_error(hub.resolve_checkpoint, "org/name")
    assert "org/name" in msg and str(cache) in msg


def test_existing_local_path_is_returned_unchanged(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    fake_repo(cache, "org/name")  # a cached repo of the same name does not win over the folder
    assert not hub.is_hub_id("org/name")
    assert hub.resolve_checkpoint("org/name") == "org/name"
    assert hub.resolve_checkpoint(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("ckpt", ["llama7b", "a/b/c", "./x", "demo", "stories260K.bin", "llama-7"])
def test_non_hub_ids_go_back_unchanged_for_the_callers_error(ckpt):
    assert hub.resolve_checkpoint(ckpt) == ckpt


@pytest.mark.parametrize("s, ok", [("a/b", True), ("meta-llama/Llama-3.1-8B", True), ("llama-7b", True),
                                   ("a/b/c", False), ("./x", False), ("../x", False), ("/abs/path", False),
                                   ("a--b/c", False), ("a/b..c", False), ("llama7b", False), ("a/", False)])
def test_is_hub_id(s, ok):
    assert hub.is_hub_id(s) is ok


def test_default_data_from_the_dataset_cache(cache):
    repo_id, filename = hub.DEFAULT_DATA
    snap = fake_repo(cache, repo_id, files=(filename,), kind="datasets")
    assert hub.default_data() == str(snap / filename)


def test_default_data_put_by_hand_where_the_error_says(cache):
    msg = one_line_error(hub.default_data)
    where = msg.split("put that file at ")[1].split(",")[0]
    os.makedirs(os.path.dirname(where))
    open(where, "w").close()
    assert hub.default_data() == where


def test_default_data_not_cached_offline_names_the_file_and_data_flag(cache):
    msg = one_line_error(hub.default_data)
    assert hub.DEFAULT_DATA[1] in msg and "--data" in msg and str(cache) in msg


# -- the download path, with huggingface_hub's functions replaced: online in name only ---------------------------------

@pytest.fixture
def online(monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return hf


def test_download_when_not_cached(online, cache, monkeypatch):
    calls = []
    monkeypatch.setattr(online, "snapshot_download", lambda repo_id, **kw: calls.append((repo_id, kw)) or "/dl/snap")
    monkeypatch.setattr(online, "hf_hub_download", lambda *a, **kw: calls.append((a, kw)) or "/dl/c4")
    monkeypatch.setattr(online, "get_hf_file_metadata", lambda url: calls.append(url))  # the fail-fast probe
    assert hub.resolve_checkpoint("llama-2-7b") == "/dl/snap"
    assert calls[0][0] == "meta-llama/Llama-2-7b-hf" and calls[0][1]["cache_dir"] == cache
    assert hub.default_data() == "/dl/c4"
    assert calls[1].endswith("datasets/allenai/c4/resolve/main/" + hub.DEFAULT_DATA[1])
    assert calls[2][0] == hub.DEFAULT_DATA and calls[2][1]["repo_type"] == "dataset"
    assert "download=False" in one_line_error(hub.resolve_checkpoint, "llama-2-7b", False)


def test_download_errors_are_one_line(online, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    def no_network(*a, **kw):
        raise ConnectionError("Name or service not known\nmore detail")
    monkeypatch.setattr(online, "snapshot_download", no_network)
    msg = one_line_error(hub.resolve_checkpoint, "org/name")
    assert "ConnectionError: Name or service not known" in msg and "hf download org/name" in msg

    def gated(*a, **kw):
        e = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response; the type is what counts
        Exception.__init__(e, "401 Client Error.\nAccess to model meta-llama/Llama-2-7b-hf is restricted.")
        raise e
    monkeypatch.setattr(online, "snapshot_download", gated)
    msg = one_line_error(hub.resolve_checkpoint, "llama-2-7b")
    assert "gated" in msg and "hf auth login" in msg and "--ckpt" in msg

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(online, "snapshot_download", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during a download stops the program, not a ValueError
        hub.resolve_checkpoint("org/name")


def test_without_huggingface_hub_only_the_cache_resolves(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` raise ImportError
    snap = fake_repo(cache, "org/name")
    assert hub.resolve_checkpoint("org/name") == str(snap)
    assert "pip install huggingface_hub" in one_line_error(hub.resolve_checkpoint, "org/other")
    assert "pip install huggingface_hub" in one_line_error(hub.default_data)
