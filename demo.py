"""The demo model: a small LLaMA trained here, from nothing but code, on procedurally generated children's stories.

`python nuteprune.py --ckpt demo` must work on a fresh machine, offline, in minutes on two CPU cores, and pruning it
must do measurable damage. So the corpus has structure a 4-layer model can learn and lose: gender agreement
(he/she, his/her), entities that recur far from where they were introduced (names, "the red kite") so that
attention has to copy them, small sums in words ("had seven ... gave two ... now had five"), counting sequences,
fixed associations (rain -> umbrella, cow -> "Moo!") and dialogue in quotes.

    stories -> train.txt / heldout.txt (blank-line-separated documents, what data.read_documents reads)
            -> SentencePiece BPE tokenizer (trained on train.txt)
            -> Llama trained with next-token cross-entropy -> checkpoint.save_model into the cache dir

The build is deterministic: the same DemoConfig gives byte-identical train.txt, heldout.txt, tokenizer.model,
config.json and model.safetensors on every run on the same kind of machine. What it depends on: this code and
llama.py; the Python version's `random` (seeded Mersenne Twister); the SentencePiece version (trained on one thread
with a fixed seed); the torch version and the CPU's instruction set (MKL and oneDNN pick kernels per CPU, and
different kernels round differently). What it does not depend on: PYTHONHASHSEED (nothing iterates a set or a
hash-ordered container), OMP_NUM_THREADS / torch.set_num_threads (the build runs on the threads `build_threads`
picks, 1 or 2, and restores the caller's setting after), the machine's load (one and two threads train to the same
bytes: tests/test_demo.py checks it), or the clock (time is only logged).
A build lives in `.<cache>-build-<host>-<pid>-*` beside the cache folder until it is complete; ensure_demo removes
such folders left by builds that were killed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import cli
import data
import evaluate
import llama
import tokenization

VERSION = 2  # bump when the corpus, tokenizer or training changes: cached builds of another version are rebuilt
# 2: always one thread (version 1 used up to two), a seeded SentencePiece trainer
FILES = ("config.json", "model.safetensors", "tokenizer.model", "train.txt", "heldout.txt")


@dataclass
class DemoConfig:
    train_docs: int = 6000
    heldout_docs: int = 300
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 344
    seq_len: int = 256  # also the model's max_seq_len
    # The loss plateaus near 0.6 nats until the model learns to copy names back (~1.1M tokens), then drops to ~0.3.
    # 800 steps x 8 sequences reach that point with margin; 400 x 16, the same tokens, often do not (0.43).
    batch_size: int = 8
    steps: int = 800
    lr: float = 6e-3
    seed: int = 1234  # train stories, init and batches; held-out stories use seed + 1
    # 0: build_threads() picks 2 on an idle machine, 1 beside other busy processes; or exactly this many. Nothing of
    # the caller's setting reaches the model: one and two threads train to the same bytes (three do not: other splits
    # of a sum round differently), so only 1 and 2 are ever picked. Idle, two threads take ~215 ms a step against
    # ~345 ms for one; beside other jobs on the 2-core machine (load ~5) 1.1-1.6 s with two, 0.45-0.5 s with one.
    threads: int = 0

# -----------------------------------------------------------------------------
# the story generator

GIRLS = "Lily Mia Sue Anna Emma Lucy Rosa Zoe Nina Kate Ella Ruby Amy Jane".split()
BOYS = "Tom Ben Sam Max Leo Jack Tim Finn Omar Hugo Luke Noah Dan Paul".split()
ANIMALS = {"cat": "Meow", "dog": "Woof", "cow": "Moo", "duck": "Quack", "sheep": "Baa", "pig": "Oink",
           "frog": "Ribbit", "owl": "Hoot", "lion": "Roar", "horse": "Neigh", "mouse": "Squeak", "bee": "Buzz"}
COLORS = "red blue green yellow pink purple orange white black brown".split()
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "gray"}
THINGS = "ball kite hat book cup box shoe boat drum doll key ring bell spoon sock bag".split()
PLACES = {"park": ["under the bench", "behind the big tree", "in the tall grass", "near the swings"],
          "garden": ["under a bush", "behind the flowers", "in the little pond", "next to the fence"],
          "beach": ["in the sand", "under a towel", "near the water", "behind a big rock"],
          "forest": ["under a log", "behind a tree", "in a hole", "near the old stump"],
          "farm": ["in the barn", "under the hay", "behind the cart", "near the gate"],
          "school": ["under a desk", "in the library", "behind the door", "near the window"]}
FOODS = "apple cookie cherry egg carrot cake plum nut grape muffin".split()
NUMBERS = "zero one two three four five six seven eight nine ten".split()
WEATHER = {"rainy": "took an umbrella", "cold": "put on a warm coat", "sunny": "put on a sun hat",
           "windy": "held on to the kite string", "snowy": "put on big boots"}
FEELINGS = {"happy": "smiled", "sad": "cried", "angry": "stamped", "sleepy": "yawned", "scared": "shook"}


def an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def count(n: int, noun: str) -> str:  # count(1, "cherry") = "one cherry", count(3, "cherry") = "three cherries"
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{NUMBERS[n]} {noun if n == 1 else plural}"


@dataclass
class Hero:
    name: str
    kind: str  # girl, boy, or an animal
    she: bool

    @property
    def he(self): return "she" if self.she else "he"
    @property
    def his(self): return "her" if self.she else "his"
    @property
    def him(self): return "her" if self.she else "him"
    @property
    def He(self): return self.he.capitalize()
    @property
    def His(self): return self.his.capitalize()


def hero(rng: random.Random, avoid: str = "") -> Hero:
    she = rng.random() < 0.5
    name = rng.choice([n for n in (GIRLS if she else BOYS) if n != avoid])
    kind = ("girl" if she else "boy") if rng.random() < 0.7 else rng.choice(list(ANIMALS))
    return Hero(name, kind, she)

# Each plot is a list of sentences about hero a and friend b at their place; a story strings 2-3 of them together.


def lost_thing(rng, a: Hero, b: Hero, place: str) -> list[str]:
    color, thing = rng.choice(COLORS), rng.choice(THINGS)
    miss, hit = rng.sample(PLACES[place], 2)
    return [f"{a.name} had {an(color)} {thing}.", f"{a.He} loved {a.his} {color} {thing} very much.",
            f"One day {a.name} lost the {thing} at the {place}.", f"{a.He} was sad.",
            f'"Have you seen my {color} {thing}?" {a.name} asked {b.name}.',
            f'"No, but I will help you look," said {b.name}.', f"They looked {miss}, but it was not there.",
            f"Then {b.name} looked {hit}.", f'"Here is your {color} {thing}!" {b.he} said.',
            f"{a.name} was happy and hugged {b.name}."]


def sharing(rng, a: Hero, b: Hero, place: str) -> list[str]:
    food = rng.choice(FOODS)
    n = rng.randint(2, 10)
    k = rng.randint(1, n - 1)
    return [f"{a.name} had {count(n, food)}.", f"At the {place}, {a.he} met {b.name}, who had none.",
            f'"Can I have some?" asked {b.name}.', f"{a.name} gave {count(k, food)} to {b.name}.",
            f"Now {a.name} had {count(n - k, food)} and {b.name} had {count(k, food)}.",
            f'"Thank you, {a.name}!" said {b.name}.']


def counting(rng, a: Hero, b: Hero, place: str) -> list[str]:
    thing = rng.choice(["bird", "star", "flower", "stone", "duck", "boat", "tree", "cloud"])
    n = rng.randint(2, 10)
    seq = ", ".join(NUMBERS[1:n + 1]).capitalize()
    return [f"At the {place}, {a.name} and {b.name} counted the {thing}s.", f'"{seq}!" said {a.name}.',
            f"There were {count(n, thing)}."]


def weather(rng, a: Hero, b: Hero, place: str) -> list[str]:
    w = rng.choice(list(WEATHER))
    return [f"The next day was {w}.", f"{a.name} wanted to go to the {place} with {b.name}.",
            f"It was {w}, so {a.he} {WEATHER[w]}."]


def pet(rng, a: Hero, b: Hero, place: str) -> list[str]:
    animal = rng.choice(list(ANIMALS))
    name = rng.choice([n for n in GIRLS + BOYS if n not in (a.name, b.name)])
    sound = ANIMALS[animal]
    return [f"{a.name} had a pet {animal} named {name}.", f'Every morning {name} the {animal} said "{sound}!"',
            f'{b.name} asked, "What does your {animal} say?"', f'"{sound}!" said {a.name}, and they laughed.']


def feeling(rng, a: Hero, b: Hero, place: str) -> list[str]:
    f = rng.choice(list(FEELINGS))
    return [f"After that, {a.name} felt {f}.", f"{a.He} {FEELINGS[f]}, and {b.name} held {a.his} hand.",
            f'"I am here for you," {b.name} told {a.him}.']


def paint(rng, a: Hero, b: Hero, place: str) -> list[str]:
    (c1, c2), mix = rng.choice(list(MIXES.items()))
    return [f"{a.name} and {b.name} painted a picture.", f'"What if we mix {c1} and {c2}?" asked {b.name}.',
            f"{a.name} mixed the {c1} paint with the {c2} paint.", f'"Look, it makes {mix}!" {a.he} said.']


def trip(rng, a: Hero, b: Hero, place: str) -> list[str]:
    # a question answered only by looking back across the sentence: what attention is for
    first, then, last = rng.sample([p for p in PLACES if p != place], 3)
    which = rng.choice(["first", "last"])
    return [f"On Sunday, {a.name} took {b.name} on a trip.",
            f"First they went to the {first}, then to the {then}, and last to the {last}.",
            f'"Where did we go {which}?" asked {a.name}.',
            f'"To the {first if which == "first" else last}!" said {b.name}.']


PLOTS = [lost_thing, sharing, counting, weather, pet, feeling, paint, trip]


def story(rng: random.Random) -> str:
    a = hero(rng)
    b = hero(rng, avoid=a.name)
    place = rng.choice(list(PLACES))
    opening = rng.choice(["Once upon a time", "One day", "Long ago", "One sunny morning"])
    s = [f"{opening}, there was a little {a.kind} named {a.name}.",
         f"{a.He} lived near the {place} with {a.his} {rng.choice(['mom', 'dad', 'grandma', 'grandpa'])}.",
         f"{a.His} best friend was {an(b.kind)} named {b.name}."]
    for plot in rng.sample(PLOTS, rng.randint(2, 3)):
        s += plot(rng, a, b, place)
    s.append(rng.choice([f"{a.name} and {b.name} went home together.", f"That night {a.name} slept well.",
                         f"{a.name} and {b.name} were best friends forever."]))
    s.append("The end.")
    return " ".join(s)  # one line: SentencePiece sees one sentence per line, so a newline would be an unknown


def stories(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s = story(rng)
        if s not in exclude:  # held-out stories never repeat a training story word for word
            out.append(s)
    return out


def write_docs(path: Path, docs: list[str]) -> None:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def read_docs(path) -> list[str]:
    return [d.strip() for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]

# -----------------------------------------------------------------------------
# tokenizer and training


def train_tokenizer(docs: list[str], vocab_size: int, out: Path, seed: int = 0) -> None:
    import sentencepiece as spm
    spm.set_random_generator_seed(seed)  # its default seed is random; BPE on every sentence may not use it, but no bet
    model = io.BytesIO()  # sentence_iterator + model_writer: no temp paths recorded inside the model file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny test corpus may not have vocab_size pieces; stop short instead of failing
        character_coverage=1.0, normalization_rule_name="identity", split_digits=True,  # LLaMA's settings
        byte_fallback=False,  # 256 byte pieces would take half of a 512 vocabulary; every character is seen
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    out.write_bytes(model.getvalue())


def token_stream(tok: tokenization.Tokenizer, docs: list[str]) -> torch.Tensor:
    # one BOS per document, no EOS: the layout data.corpus_tokens gives the calibration blocks
    return torch.tensor([t for d in docs for t in tok.encode(d, bos=True)], dtype=torch.long)


def mean_loss(model: llama.Llama, ids: torch.Tensor, seq_len: int, max_blocks: int | None = None) -> float:
    # non-overlapping blocks, like data.calibration_blocks
    return evaluate.mean_nll(model, evaluate.windows(ids, seq_len, max_blocks), batch_size=16)


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    # cross-entropy of held-out tokens under add-one-smoothed train token frequencies: the bar a trained LM must clear
    p = (torch.bincount(train, minlength=vocab).double() + 1) / (len(train) + vocab)
    return -p.log()[heldout].mean().item()


def train_model(cfg: DemoConfig, train: torch.Tensor, vocab: int, log) -> tuple[llama.Llama, list[float]]:
    torch.manual_seed(cfg.seed)
    model = llama.Llama(llama.LlamaConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                          n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, vocab_size=vocab,
                                          max_seq_len=cfg.seq_len, norm_eps=1e-5))
    for m in model.modules():  # HF LLaMA's initializer_range: N(0, 0.02) trains faster than PyTorch's defaults
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on the norm gains
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        # linear warmup, then cosine decay to 10% of the peak
        frac = (step - warmup) / max(1, cfg.steps - warmup)
        lr = cfg.lr * (step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        start = torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([train[s:s + cfg.seq_len + 1] for s in start.tolist()])  # (B, T + 1)
        logits = model(x[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps:
            ms = (time.time() - t0) / step * 1000
            log(f"demo: step {step}/{cfg.steps} | loss {loss.item():.3f} | lr {lr:.2e} | {ms:.0f} ms/step | "
                f"ETA {ms * (cfg.steps - step) / 1000:.0f}s")
    return model.eval(), losses


def build_threads() -> int:
    """Threads for the build: 2 on a machine of two or more cores idle at the start (cli.busy_cores), else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 and cli.busy_cores() <= cli.BUSY else 1


def build_demo(out: Path, cfg: DemoConfig, log) -> dict:
    """Corpus, tokenizer and trained model written into the directory `out`; returns the build statistics."""
    t0 = time.time()
    train_docs = stories(cfg.train_docs, cfg.seed)
    heldout_docs = stories(cfg.heldout_docs, cfg.seed + 1, exclude=set(train_docs))
    write_docs(out / "train.txt", train_docs)
    write_docs(out / "heldout.txt", heldout_docs)
    train_tokenizer(train_docs, cfg.vocab_size, out / "tokenizer.model", cfg.seed)
    tok = tokenization.SentencePieceTokenizer(out / "tokenizer.model")
    train, heldout = token_stream(tok, train_docs), token_stream(tok, heldout_docs)
    log(f"demo: {len(train_docs)} train stories ({len(train)} tokens), {len(heldout_docs)} held-out stories "
        f"({len(heldout)} tokens), vocabulary {tok.vocab_size}; training {cfg.steps} steps")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or build_threads())  # exactly, not at most: see DemoConfig.threads
    log(f"demo: training on {torch.get_num_threads()} thread(s)")
    try:
        model, losses = train_model(cfg, train, tok.vocab_size, log)
        stats = {"first_loss": losses[0], "train_loss": mean_loss(model, train, cfg.seq_len, max_blocks=64),
                 "heldout_loss": mean_loss(model, heldout, cfg.seq_len),
                 "unigram_loss": unigram_loss(train, heldout, tok.vocab_size)}
    finally:
        torch.set_num_threads(threads)
    checkpoint.save_model(model, out, out / "tokenizer.model")
    stats["seconds"] = round(time.time() - t0, 1)
    log(f"demo: train loss {stats['train_loss']:.3f}, held-out loss {stats['heldout_loss']:.3f} "
        f"(perplexity {math.exp(stats['heldout_loss']):.2f}; unigram baseline {math.exp(stats['unigram_loss']):.1f}) "
        f"after {stats['seconds']:.0f}s")
    return stats

# -----------------------------------------------------------------------------
# the cache: built once, atomically, checked by content hashes on every use


def default_cache_dir() -> Path:
    return data.default_cache_dir() / "demo"  # one variable (NUTEPRUNE_CACHE) moves every cache


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _paths(folder: Path) -> dict:
    return {"ckpt": str(folder), "tokenizer": str(folder / "tokenizer.model"),
            "train_text": str(folder / "train.txt"), "heldout_text": str(folder / "heldout.txt")}


def _recipe(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "threads"}  # the threads change no byte (DemoConfig.threads)


def read_manifest(folder: Path, cfg: DemoConfig) -> dict | None:
    """The build's manifest if every file is present and unchanged and it was built from `cfg`, else None."""
    try:
        manifest = json.loads((folder / "demo.json").read_text())
        ok = (manifest["version"] == VERSION and _recipe(manifest["config"]) == _recipe(asdict(cfg))
              and all(_sha256(folder / f) == manifest["sha256"][f] for f in FILES))
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed: rebuild
        return None
    return manifest if ok else None


# Work folders beside the cache folder: `.demo-build-<host>-<pid>-<random>` holds a build until it is complete,
# `.demo-old-<host>-<pid>-<random>` a replaced build until it is deleted. The host and pid say whose they are.
STALE_UNKNOWN_S = 24 * 3600  # a work folder another host (or an older version) left: removed once this old


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"  # no "-": the name parses unambiguously


def _work_prefix(out: Path, kind: str) -> str:
    return f".{out.name}-{kind}-{_host()}-{os.getpid()}-"  # mkdtemp appends [a-z0-9_]{8}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process (or not a pid we can ask about): assume alive
        return True
    return True


def remove_stale_builds(out: Path, log=None) -> list[Path]:
    """Remove the work folders of `out` that killed builds left behind: those of this host whose process is gone, and
    any other (another host's, or unnamed by an older version) untouched for STALE_UNKNOWN_S. A live build's folder
    is never removed: its process exists (on another host: it was touched in the last day). Returns what it removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}-(?:build|old)-(?:(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-)?[^-]+")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in sorted(entries):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir():
            continue
        if m["pid"] and m["host"] == _host():
            stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > STALE_UNKNOWN_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    if removed and log:
        log(f"demo: removed {len(removed)} folder(s) left by interrupted builds: {', '.join(p.name for p in removed)}")
    return removed


def ensure_demo(cache_dir=None, log=None, cfg: DemoConfig | None = None) -> dict:
    """Paths of the demo checkpoint, tokenizer and texts, building them first unless a valid build is cached."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = cfg or DemoConfig()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    remove_stale_builds(out, log)
    if read_manifest(out, cfg):
        return _paths(out)
    log(f"demo: building the demo model in {out} (once; a few minutes on a CPU)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_work_prefix(out, "build")))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700: the cache folder gets the umask's mode, as mkdir gives
        stats = build_demo(tmp, cfg, log)
        manifest = {"version": VERSION, "config": asdict(cfg), "stats": stats,
                    "sha256": {f: _sha256(tmp / f) for f in FILES}}
        (tmp / "demo.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():  # a stale or corrupt build: os.replace cannot overwrite a non-empty directory
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_work_prefix(out, "old")))
            os.replace(out, old / out.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)  # readers see the old build, no build, or the whole new one; never half of one
    except OSError:
        if not read_manifest(out, cfg):  # unless a concurrent ensure_demo just put a valid build in place
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(out)


def main(argv=None):
    ap = cli.Parser(description="Build (once) the demo model and show what it learned.")
    ap.add_argument("--cache-dir", default=None, help="default: $NUTEPRUNE_CACHE/demo or ~/.cache/nuteprune/demo")
    ap.add_argument("--rebuild", action="store_true", help="build again even if a valid build is cached")
    args = ap.parse_args(argv)
    folder = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.rebuild:
        (folder / "demo.json").unlink(missing_ok=True)
    paths = ensure_demo(folder)
    model, tok = checkpoint.load(paths["ckpt"])
    stats = json.loads((folder / "demo.json").read_text())["stats"]
    heldout = token_stream(tok, read_docs(paths["heldout_text"]))
    loss = mean_loss(model, heldout, model.config.max_seq_len)  # from the saved checkpoint, not the build's memory
    prompt = "Once upon a time, there was a little girl named Lily."
    idx = torch.tensor([tok.encode(prompt, bos=True)])
    # the model starts each story with BOS, so BOS marks the end of this one
    out = llama.generate(model, idx, max_new_tokens=model.config.max_seq_len - idx.shape[1], eos_id=tok.bos_id)
    print(f"checkpoint: {paths['ckpt']} ({llama.count_params(model):,} parameters, built in {stats['seconds']:.0f}s)")
    print(f"held-out perplexity {math.exp(loss):.2f} (unigram baseline {math.exp(stats['unigram_loss']):.1f})")
    print(f"greedy sample:\n{tok.decode(out[0, 1:].tolist())}")


if __name__ == "__main__":
    main()
