"""What a run recorded names what anyone can rerun (STYLE.md 16): commands and files relative to the repository
(`python evaluate.py --ckpt runs/...`, `../shared/...`), never an absolute path of the machine that ran it (its
interpreter, its scratch folders, its checkout)."""
import re

from conftest import ROOT

# folders whose results are being regenerated and are not checked yet (none now: issue 28's grid landed)
PENDING = ()

# a "/" that starts a path (not one inside a word, a number, a URL or a relative path), then a folder name and "/"
ABSOLUTE = re.compile(r"(?<![\w.~:/\\-])/[A-Za-z_][\w.+-]*/[\w.+-]")


def absolute_paths(text: str) -> list[str]:
    return [text[max(0, m.start() - 30):m.end() + 40].replace("\n", " ") for m in ABSOLUTE.finditer(text)]


def recorded_files() -> list:
    files = [p for p in (ROOT / "experiments" / "results").rglob("*") if p.is_file()] + \
        sorted((ROOT / "bench").glob("*.json"))
    pending = [ROOT / p for p in PENDING]
    return [p for p in files if not any(p.is_relative_to(q) for q in pending)]


def test_the_pattern_finds_absolute_paths_and_nothing_else():
    found = absolute_paths('"ckpt": "/work/shared/data/stories260K/stories260K.bin", "python": "/usr/bin/python3",'
                           ' cd /home/me/x && /root/.venv/bin/python nuteprune.py --out /tmp/tmpab12/out')
    assert len(found) == 5, found
    assert not absolute_paths('"ckpt": "../shared/data/stories260K/stories260K.bin" runs/pkd/x pp512 / tg128 '
                              '0.58x/0.52x heads 6/9 https://github.com/karpathy/llama2.c and/or')


def test_recorded_results_name_no_absolute_path():
    found = {}
    for p in recorded_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # figures
            continue
        if hits := absolute_paths(text):
            found[str(p.relative_to(ROOT))] = hits[:3] + ([f"... {len(hits)} in all"] if len(hits) > 3 else [])
    assert not found, "absolute paths in recorded results (record paths relative to the repository):\n" + \
        "\n".join(f"{k}: {v}" for k, v in found.items())


def test_results_name_files_relative_to_the_repository_or_by_name_alone():
    import cli
    assert cli.recorded_path(ROOT / "runs" / "pkd" / "x") == "runs/pkd/x"
    assert cli.recorded_path(ROOT.parent / "shared" / "data" / "wiki.test.raw") == "../shared/data/wiki.test.raw"
    scratch = ROOT.parent.parent / "scratch-of-a-machine" / "work" / "dense-q8_0.gguf"
    assert cli.recorded_path(scratch) == "dense-q8_0.gguf"
    assert not absolute_paths(cli.recorded_path("/tmp/nuteprune-llama-cpp-speed/dense-q8_0.gguf"))
