"""The command line of `python nuteprune.py`: its flags (defaults: nuteprune.RunConfig's, the paper's recipe), every
check that needs no model (values, paths, an occupied --out), --resume's rule for which flags may change, and
`--ckpt demo`'s defaults. parse_args() returns the run's RunConfig and how the run starts.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import fields, replace
from pathlib import Path

import checkpoint
import cli
import data
import hub
import llama
import runfolder
from runfolder import RESUMABLE, RUN_FILES

LAYER_LOSSES = ("paper", "all", "scaled", "cosine")  # nuteprune.layer_loss's kinds

def build_parser(config: type) -> argparse.ArgumentParser:
    p = cli.Parser(description="NutePrune: prune a LLaMA checkpoint to a target sparsity by "
                                "progressive distillation (defaults: the paper's recipe).")
    d = {f.name: f.default for f in fields(config)}  # one source of defaults: nuteprune.RunConfig
    for add in (_run_flags, _schedule_flags, _distill_flags, _finetune_flags):
        add(p, d)
    return p


def _run_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("run")
    g.add_argument("--ckpt", help="base model: HF directory, Meta directory, llama2.c .bin, .gguf, hub id (org/name), "
                                  "short name (llama-7b, README), or demo (built by demo.py)")
    g.add_argument("--target", type=float, help="fraction of prunable weights (q,k,v,o,gate,up,down) to remove")
    g.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or .gguf (default: beside --ckpt, or inside it)")
    g.add_argument("--data", help="calibration text: C4 .json(l)(.gz) with a 'text' field, or plain text (default: C4 en "
                                  "shard 00000 from the Hugging Face cache)")
    g.add_argument("--out", default=d["out"], help="output directory: state.pt, log.jsonl, report.json, pruned/")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint; flags given with it "
                   "must match the run's, except --log-every, --save-every, --max-steps, --ft-max-steps, --device, "
                   "--grad-ckpt, --cache-dir, which change")
    g.add_argument("--plan", action="store_true",
                   help="print the run's steps, snapshots, memory per GPU and host RAM per node for 1/2/4/8 GPUs "
                   "from --ckpt's config.json alone (no weights read), then exit")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one, removing its state.pt, log.jsonl, report.json, "
                   "pruned/")
    g.add_argument("--max-steps", type=int, help="cap the pruning steps; every schedule scales to the cap")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of initialisation, mask samples and data order")
    g.add_argument("--device", default=d["device"], help="torch device (auto: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=list(llama.DTYPES), default=d["dtype"],
                   help="frozen base weights and autocast (auto: bf16 on GPU, fp32 on CPU); gates and LoRA stay fp32")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer gradient checkpointing (default: on for GPU)")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="steps between held-out perplexities of the student's deterministic masks in log.jsonl; also "
                   "each snapshot teacher's (0: never)")
    g.add_argument("--tolerance", type=float, default=d["tolerance"], help="largest |final sparsity - target| accepted")
    g.add_argument("--round-to", type=int, default=d["round_to"], metavar="N",
                   help="final masks in hardware-friendly widths: per layer FFN channels in multiples of N and equal "
                   "query heads per K/V head, the hidden width a multiple of N (32: Q4_0/Q8_0, 256: K-quants, 64/128: "
                   "GPU kernels; 1: the paper's)")
    g.add_argument("--keep-hidden", action="store_true",
                   help="prune attention heads and FFN channels only, keep the hidden width (the paper prunes it too); "
                   "a hidden dimension costs less decode time than its weights in llama.cpp (docs/deployment.md)")
    g.add_argument("--cache-dir", help="token cache (default: $NUTEPRUNE_CACHE or ~/.cache/nuteprune)")


def _schedule_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("data and schedule (METHOD.md §7)")
    g.add_argument("--n-docs", type=int, default=d["n_docs"], help="documents read from --data")
    g.add_argument("--block-size", type=int, default=d["block_size"], help="tokens per training block")
    g.add_argument("--heldout", help="held-out text for perplexity before/after (default: the last blocks of --data)")
    g.add_argument("--heldout-blocks", type=int, default=d["heldout_blocks"], help="blocks of held-out text for perplexity")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="pruning epochs")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="blocks per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"],
                   help="blocks (Alpaca examples) per forward; gradients accumulate")
    g.add_argument("--warmup-epochs", type=float, help="target warm-up (default: 4 for targets <= 0.25, else 1)")
    g.add_argument("--lr-lora", type=float, default=d["lr_lora"], help="LoRA learning rate, decays linearly to 0")
    g.add_argument("--lr-mask", type=float, default=d["lr_mask"], help="log_alpha learning rate (constant)")
    g.add_argument("--lr-lambda", type=float, default=d["lr_lambda"], help="lambda_1, lambda_2 learning rate (ascent)")
    g.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clipping of the LoRA parameters")


def _distill_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("LoRA and distillation (METHOD.md §5-§7)")
    g.add_argument("--no-lora", action="store_true", help="ablation: train masks only, without LoRA")
    g.add_argument("--lora-targets", default=d["lora_targets"], help="projections with LoRA while pruning")
    g.add_argument("--lora-rank", type=int, default=d["lora_rank"], help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=d["lora_alpha"], help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--distill", choices=["pkd", "kd", "none"], default=d["distill"],
                   help="pkd: progressive teachers; kd: the intact model teaches; none: next-token cross-entropy")
    g.add_argument("--kd-temp", type=float, default=d["kd_temp"], help="distillation temperature T (Eq. 7; default: 2/3)")
    g.add_argument("--kd-weight", type=float, default=d["kd_weight"], help="weight of the logit KL (Eq. 9)")
    g.add_argument("--layer-weight", type=float, default=d["layer_weight"], help="weight of the layer loss (Eq. 9); "
                   "with --layer-balance, the layer term's size relative to the weighted KL term")
    g.add_argument("--layer-loss", choices=LAYER_LOSSES, default=d["layer_loss"],
                   help="Eq. 8 as published (paper: MSE over the student's non-zero dims), or for massive activations "
                   "all (MSE over every dim), scaled (MSE per dim over the teacher's mean square), cosine")
    g.add_argument("--layer-balance", action="store_true", help="rescale the layer term every step to --layer-weight "
                   "times the KL term (Minitron)")
    g.add_argument("--keep-outliers", type=int, default=d["keep_outliers"], metavar="N",
                   help="never prune the N hidden dims of largest activation (massive activations; 0: none)")
    g.add_argument("--lambda-optim", choices=("adam", "sgd"), default=d["lambda_optim"],
                   help="update of lambda_1, lambda_2: adam (the reference) or sgd (plain gradient ascent, in "
                   "proportion to the gap)")
    g.add_argument("--gate-init", choices=("paper", "activation"), default=d["gate_init"],
                   help="log_alpha at the start: the reference's (every unit alike), or ordered by Minitron's "
                   "activation importance on 8 calibration blocks (the least important pruned first)")
    g.add_argument("--settle", type=float, default=d["settle"], metavar="F",
                   help="the last F of the pruning steps train LoRA under the final masks, the gates fixed (0: none)")
    g.add_argument("--lambda-2", type=float, default=d["lambda_2"], metavar="K",
                   help="hold lambda_2 at K instead of training it: a fixed proportional gain on the gap (with "
                   "--lambda-optim sgd, lambda_1 the integral: a PI controller)")
    g.add_argument("--recipe", choices=list(RECIPES), default=d["recipe"],
                   help="paper: the published recipe; modern: its changes for models with massive activations "
                   "(Llama-3, SmolLM2, TinyLlama: docs/METHOD.md), flags given beside it win")
    g.add_argument("--gap", type=float, default=d["gap"], help="sparsity gap between student and teacher (pkd)")
    g.add_argument("--interval", type=float, default=d["interval"], help="sparsity between two snapshots (pkd)")


def _finetune_flags(p: argparse.ArgumentParser, d: dict):
    g = p.add_argument_group("post fine-tuning (METHOD.md §7)")
    g.add_argument("--ft-data", help="Stanford-Alpaca JSON; enables post fine-tuning with the masks fixed")
    g.add_argument("--ft-epochs", type=int, default=d["ft_epochs"], help="post fine-tuning epochs")
    g.add_argument("--ft-max-steps", type=int, help="cap the post fine-tuning steps")
    g.add_argument("--ft-lr", type=float, default=d["ft_lr"], help="post fine-tuning LoRA learning rate, decays to 0")
    g.add_argument("--ft-batch-size", type=int, default=d["ft_batch_size"], help="examples per post fine-tuning step")
    g.add_argument("--ft-max-len", type=int, default=d["ft_max_len"], help="tokens per Alpaca example")
    g.add_argument("--ft-lora-targets", default=d["ft_lora_targets"], help="projections with LoRA in post fine-tuning")


# --recipe: the paper's (every default) or the changes that make NutePrune work on models with massive activations
# (docs/METHOD.md §2, §4, §5), measured on SmolLM2-135M (experiments/results/smollm2). Explicit flags still win.
RECIPES = {"paper": {},
           "modern": dict(layer_loss="cosine", layer_balance=True, layer_weight=1.0, keep_outliers=8,
                          gate_init="activation", lambda_optim="sgd", lr_lambda=30.0, lambda_2=1000.0)}

# `--ckpt demo`: the small LLaMA that demo.py trains from nothing but code (cached after the first run), its own
# story text for calibration and held-out perplexity, and a step budget that fits a few minutes on two CPU cores.
# Explicit flags still win; everything else is the paper's recipe.
DEMO_DEFAULTS = dict(max_steps=240, block_size=256, batch_size=8, micro_batch_size=8, lr_mask=1.0, lr_lambda=2.0,
                     heldout_blocks=64, log_every=20, save_every=100)  # mask rates that reach the target in 240 steps


def check_config(c):
    """Every check of a nuteprune.RunConfig that needs no file (RunConfig.__post_init__): one line naming the flag."""
    if not 0 < c.target < 1:
        raise ValueError(f"--target must lie in (0, 1), got {c.target}")
    if not 0 < c.interval < c.target or c.gap < c.interval:
        raise ValueError(f"need 0 < --interval < --target and --gap >= --interval, got {c.interval}, {c.gap}")
    for name in ("epochs", "batch_size", "micro_batch_size", "log_every", "save_every", "ft_batch_size",
                 "block_size", "n_docs", "ft_epochs", "ft_max_len", "lora_rank", "round_to"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    for name in ("max_steps", "ft_max_steps"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if c.heldout_blocks < 0 or c.eval_every < 0:
        raise ValueError(f"--heldout-blocks and --eval-every must be at least 0, got {c.heldout_blocks}, "
                         f"{c.eval_every}")
    if c.distill not in ("pkd", "kd", "none"):
        raise ValueError(f"--distill must be pkd, kd or none, got {c.distill!r}")
    if c.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {c.recipe!r}")
    if c.layer_loss not in LAYER_LOSSES:
        raise ValueError(f"--layer-loss must be one of {', '.join(LAYER_LOSSES)}, got {c.layer_loss!r}")
    if c.lambda_optim not in ("adam", "sgd"):
        raise ValueError(f"--lambda-optim must be adam or sgd, got {c.lambda_optim!r}")
    if not 0 <= c.settle < 1:
        raise ValueError(f"--settle must lie in [0, 1), got {c.settle}")
    if c.gate_init not in ("paper", "activation"):
        raise ValueError(f"--gate-init must be paper or activation, got {c.gate_init!r}")
    if c.lambda_2 is not None and c.lambda_2 < 0:
        raise ValueError(f"--lambda-2 must be at least 0, got {c.lambda_2}")
    if c.keep_outliers < 0 or c.layer_weight < 0 or c.kd_weight < 0:
        raise ValueError(f"--keep-outliers, --layer-weight and --kd-weight must be at least 0, got {c.keep_outliers}, "
                         f"{c.layer_weight}, {c.kd_weight}")
    llama.parse_dtype(c.dtype, "cpu")  # names the valid values


def check_paths(c, start: str):
    """Every file and folder a run reads or writes, checked before any is loaded (--ckpt demo is built after it)."""
    if c.ckpt != "demo":
        checkpoint.check_checkpoint(c.ckpt)
    for flag, path in (("--tokenizer", c.tokenizer), ("--data", c.data), ("--heldout", c.heldout),
                       ("--ft-data", c.ft_data)):
        if path is not None:
            data.check_file(path, flag)
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    found = [name for name in RUN_FILES[:3] if (out / name).exists()]
    if found and start == "new":
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or start "
                         f"over with --overwrite")


PATH_FLAGS = ("ckpt", "tokenizer", "data", "heldout", "ft_data")


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The flags written on the command line (not their defaults), by RunConfig field name."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def resume_config(parser, argv, out: str, config: type):
    """The saved run's configuration with the flags given beside --resume applied: RESUMABLE ones change, any other
    must equal the saved value (a one-line error otherwise)."""
    s = runfolder.load_state(out)
    saved = config.from_dict({**s["config"], "out": out})
    given = {k: v for k, v in given_flags(parser, argv).items() if k not in ("resume", "out")}
    changes = {}
    for k, v in given.items():
        old = getattr(saved, k)
        same = (v is not None and old is not None and Path(v).resolve() == Path(old).resolve()) \
            if k in PATH_FLAGS else v == old
        if same:
            continue
        if k not in RESUMABLE:
            raise ValueError(f"--{k.replace('_', '-')} {v} differs from the run's {old}: it cannot change on --resume "
                             f"(these can: {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)})")
        changes[k] = v
    if "max_steps" in changes and (s["phase"] != "prune" or (changes["max_steps"] or 0) < s["step"]):
        raise ValueError(f"--max-steps {changes['max_steps']}: pruning is at step {s['step']} ({s['phase']}); a new "
                         f"cap must lie beyond it and pruning must not have ended")
    if "ft_max_steps" in changes and (changes["ft_max_steps"] or 0) < s["ft_step"]:
        raise ValueError(f"--ft-max-steps {changes['ft_max_steps']} lies before post fine-tuning step {s['ft_step']}")
    return replace(saved, **changes)


def parse_args(argv, config: type) -> tuple:
    """(the run's configuration, how it starts: new, resume or overwrite): every flag and path checked before any
    work."""
    parser = build_parser(config)
    a = parser.parse_args(argv)
    if a.resume:
        if a.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        return resume_config(parser, argv, a.resume, config), "resume"
    if a.ckpt == "demo" or a.recipe != "paper":  # their defaults under the flags given
        parser.set_defaults(**(DEMO_DEFAULTS if a.ckpt == "demo" else {}), **RECIPES[a.recipe])
        a = parser.parse_args(argv)
    for name in ("ckpt", "target"):
        if getattr(a, name) is None:
            raise ValueError(f"--{name} is required (or --resume OUT)")
    if a.ckpt != "demo":
        a.ckpt = hub.resolve_checkpoint(a.ckpt)  # a hub id or a short name: its folder in the Hugging Face cache
        if a.data is None and not a.plan:
            a.data = hub.default_data()  # the paper's calibration set, C4 en shard 00000, from the same cache
    c = config(**{f.name: getattr(a, f.name) for f in fields(config)})  # checks every value
    if a.plan:
        return c, "plan"
    if c.ft_data is None and c.ft_max_steps is not None:
        raise ValueError("--ft-max-steps needs --ft-data (post fine-tuning runs only with an Alpaca file)")
    start = "overwrite" if a.overwrite else "new"
    check_paths(c, start)
    if c.ckpt == "demo":
        import demo  # only here: building the demo model needs nothing else
        paths = demo.ensure_demo(Path(c.cache_dir) / "demo" if c.cache_dir else None)
        c = replace(c, ckpt=paths["ckpt"], tokenizer=c.tokenizer or paths["tokenizer"],
                    data=c.data or paths["train_text"], heldout=c.heldout or paths["heldout_text"])
    return c, start
