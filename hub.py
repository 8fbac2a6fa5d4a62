"""What a user types as --ckpt (a path, `org/name`, or a short name like `llama-7b`) and the default --data (the
paper's C4 shard), resolved to local paths through the Hugging Face cache. huggingface_hub is optional: without it,
or offline, only what is already cached resolves, and anything else is a one-line ValueError naming the fix."""
import os
import re
from pathlib import Path

# The names the README documents; each maps to the hub repository that holds the Hugging Face layout of the weights.
SHORT_NAMES: dict[str, str] = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}

# The paper's calibration set: C4 `en` train shard 00000, in the allenai/c4 dataset repository.
DEFAULT_DATA = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")

# Each half of `org/name` as huggingface_hub's validate_repo_id accepts it: starts and ends alphanumeric, which
# keeps './x' and '../x' out; '--' and '..' are refused separately, as the hub does.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES
_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # config, weights, both tokenizer kinds; no .bin/.pth


def hub_cache_dir() -> Path:
    # The order huggingface_hub.constants reads these in, so we look where `hf download` wrote.
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        cache = os.path.join(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def is_hub_id(s: str) -> bool:
    if s.lower() in SHORT_NAMES:
        return True
    return bool(_HUB_ID.fullmatch(s)) and "--" not in s and ".." not in s and not os.path.exists(s)


def _offline() -> bool:
    # Same rule as huggingface_hub, read now rather than at its import time, so a test's monkeypatch holds.
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def _cached(repo_id: str, repo_type: str, holds: str) -> Path | None:
    # Cache layout: <cache>/{type}s--{org}--{name}/refs/main holds a commit; snapshots/<commit>/ holds the files.
    repo = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / holds).is_file():
            return snap
    # No refs/main (fetched by commit, or a cache copied or filled by hand), or a partial snapshot under it:
    # the newest snapshot that holds the file we need.
    snaps = [s for s in (repo / "snapshots").glob("*") if (s / holds).is_file()]
    return max(snaps, key=lambda s: s.stat().st_mtime, default=None)


def _download(what: str, repo_id: str, repo_type: str, download: bool, fix: str, fetch) -> str:
    # fetch(huggingface_hub, cache_dir) -> local path. Every failure becomes one line: `what`, why, and `fix`.
    cache = hub_cache_dir()
    why = "download=False" if not download else "offline: HF_HUB_OFFLINE is set" if _offline() else None
    if why is None:
        try:
            import huggingface_hub
        except ImportError:
            why = "huggingface_hub is not installed: pip install huggingface_hub"
    if why is None:
        try:
            return str(fetch(huggingface_hub, cache))
        except Exception as e:  # connection, HTTP, validation, disk: huggingface_hub raises many types
            from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError  # here since 0.14 and in 2.x
            url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
            if isinstance(e, GatedRepoError):  # meta-llama: licence and token needed
                raise ValueError(f"{what} is gated on the Hugging Face hub: accept its licence at {url}, run "
                                 f"`hf auth login` (`huggingface-cli login` before huggingface_hub 0.34) and retry; "
                                 f"{fix}") from e
            if isinstance(e, RepositoryNotFoundError):
                raise ValueError(f"{what} is not on the Hugging Face hub ({url}), or is private: check the name or "
                                 f"run `hf auth login`; {fix}") from e
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
    raise ValueError(f"{what} is not in the Hugging Face cache ({cache}) and cannot be downloaded here ({why}); {fix}")


def resolve_checkpoint(ckpt: str, download: bool = True) -> str:
    # A path, or anything that is not a hub id ('llama7b', 'a/b/c', a near miss of a short name), goes back
    # unchanged: the caller's "does not exist" error, and any "did you mean", name it better than we could.
    if os.path.exists(ckpt) or not is_hub_id(ckpt):
        return ckpt
    repo_id = SHORT_NAMES.get(ckpt.lower(), ckpt)
    snap = _cached(repo_id, "model", "config.json")
    if snap is not None:
        return str(snap)
    what = f"{ckpt} = {repo_id}" if repo_id != ckpt else repo_id
    fix = (f"run `hf download {repo_id}` on a machine with internet and copy {hub_cache_dir()} here, "
           f"or pass --ckpt /path/to/folder")
    return _download(what, repo_id, "model", download, fix, lambda hf, cache: hf.snapshot_download(
        repo_id, cache_dir=cache, allow_patterns=_MODEL_FILES))


def default_data(download: bool = True) -> str:
    repo_id, filename = DEFAULT_DATA
    snap = _cached(repo_id, "dataset", filename)
    if snap is not None:
        return str(snap / filename)
    # Any snapshot folder name works for a file put there by hand (see _cached); 'main' reads best.
    by_hand = hub_cache_dir() / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / "main" / filename
    fix = (f"run `hf download {repo_id} {filename} --repo-type dataset` with internet, or put that file at "
           f"{by_hand}, or pass --data PATH")

    def fetch(hf, cache):
        # hf_hub_download retries a dead network for ~25 s when nothing is cached; one HEAD without retries fails
        # in well under a second offline, and raises the gated / not-found errors the same way.
        hf.get_hf_file_metadata(hf.hf_hub_url(repo_id, filename, repo_type="dataset"))
        return hf.hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache)
    return _download(f"the default --data ({filename} of dataset {repo_id})", repo_id, "dataset", download, fix, fetch)
