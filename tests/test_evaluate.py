import json
import math

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import evaluate as ev
import llama
import tokenization
from conftest import GQA, CharTokenizer, need, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Every model here is tiny: a second thread saves nothing, and on a busy 2-core machine OpenMP threads that wait
    # for each other make each small forward pass up to 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# -- prompts: hand-written expectations of lm-evaluation-harness v0.3 (METHOD.md §9) ------------------------------------

PROMPT_CASES = {
    "boolq": ({"passage": "Ethanol fuel is made from corn.", "question": "is ethanol made from corn", "answer": True,
               "label": 1},
              ["Ethanol fuel is made from corn.\nQuestion: is ethanol made from corn?\nAnswer:"] * 2,
              [" no", " yes"], 1, None),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it with a fork", "label": 0},
             ["Question: Open a jar\nAnswer:"] * 2, [" twist the lid", " hit it with a fork"], 0,
             ["twist the lid", "hit it with a fork"]),
    # a WikiHow item: " [title]" becomes ". ", other [brackets] vanish, double spaces collapse; ctx_b is capitalised
    "hellaswag": ({"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat it.",
                   "ctx_b": "then you", "endings": ["[step] Scrub the grates  with a brush.", "eat  the grill."],
                   "label": "0"},
                  ["Home and Garden: How to clean a grill. Heat it. Then you"] * 2,
                  ["  Scrub the grates with a brush.", " eat the grill."], 0,
                  [" Scrub the grates with a brush.", "eat the grill."]),
    "winogrande": ({"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                    "option1": "Sarah", "option2": "Maria", "answer": "2"},
                   ["Sarah was a much better surgeon than Maria so Sarah",
                    "Sarah was a much better surgeon than Maria so Maria"],
                   [" always got the easier cases."] * 2, 1, None),
    "arc_easy": ({"id": "x", "question": "Which is a mammal?",
                  "choices": {"text": ["shark", "whale", "trout"], "label": ["1", "2", "3"]}, "answerKey": "2"},
                 ["Question: Which is a mammal?\nAnswer:"] * 3, [" shark", " whale", " trout"], 1,
                 ["shark", "whale", "trout"]),
    "arc_challenge": ({"id": "y", "question": "What melts ice?",
                       "choices": {"text": ["heat", "cold", "dark", "wind"], "label": list("ABCD")}, "answerKey": "A"},
                      ["Question: What melts ice?\nAnswer:"] * 4, [" heat", " cold", " dark", " wind"], 0,
                      ["heat", "cold", "dark", "wind"]),
    "openbookqa": ({"id": "880", "question_stem": "Predators eat",
                    "choices": {"text": ["lions", "humans", "bunnies", "grass"], "label": list("ABCD")},
                    "answerKey": "C "},
                   ["Predators eat"] * 4, [" lions", " humans", " bunnies", " grass"], 2,
                   ["lions", "humans", "bunnies", "grass"]),
}


@pytest.mark.parametrize("task", sorted(PROMPT_CASES))
def test_prompts_match_harness_v03(task):
    item, contexts, continuations, gold, choices = PROMPT_CASES[task]
    doc = ev.build_doc(task, item)
    assert doc.contexts == contexts
    assert doc.continuations == continuations
    assert doc.gold == gold
    assert doc.choices == choices  # None: the harness reports no acc_norm for this task


def test_mmlu_prompt_hendrycks_format():
    dev = [{"question": f"Q{i}?", "subject": "high_school_physics", "choices": ["a", "b", "c", "d"], "answer": i % 4}
           for i in range(6)]
    item = {"question": "What is g?", "subject": "high_school_physics", "choices": ["9.8", "1", "0", "3"], "answer": 0}
    shot = "Q{}?\nA. a\nB. b\nC. c\nD. d\nAnswer: {}\n\n"
    expected = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                + "".join(shot.format(i, "ABCD"[i % 4]) for i in range(5))  # the first five dev questions
                + "What is g?\nA. 9.8\nB. 1\nC. 0\nD. 3\nAnswer:")
    tok = CharTokenizer()
    doc, = ev.mmlu_docs(dev, [item], tok, max_len=2048)
    assert doc.contexts == [expected] * 4 and doc.continuations == [" A", " B", " C", " D"] and doc.gold == 0
    assert doc.subject == "high_school_physics"
    # too long for the model: shots are dropped from the end until BOS + prompt + answer fits
    doc, = ev.mmlu_docs(dev, [item], tok, max_len=len(expected) - 2 * len(shot.format(9, "A")) + 2)
    assert doc.contexts[0].count("Answer:") == 4


def test_bad_items_raise_value_error():
    with pytest.raises(ValueError, match="Hugging Face fields"):
        ev.build_doc("piqa", {"goal": "x"})
    with pytest.raises(ValueError, match="unknown task"):
        ev.build_doc("copa", {})

# -- tokenisation: fixed (in context) and legacy (separately) --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tok():
    return tokenization.SentencePieceTokenizer(need("llama_tokenizer", "tokenizer.model"))


def pieces(tok, ids):
    return [tok.sp.IdToPiece(i) for i in ids]


def test_continuation_tokenisation(llama_tok):
    tok = llama_tok
    ctx, cont = ev.encode_pair(tok, "Question: is it?\nAnswer:", " yes", "legacy")
    assert pieces(tok, cont) == ["▁", "▁yes"]  # the extra '▁' the paper's Table 1 numbers score
    assert ctx == tok.encode("Question: is it?\nAnswer:") and tok.bos_id not in ctx  # zero-shot: no BOS
    ctx2, cont = ev.encode_pair(tok, "Question: is it?\nAnswer:", " yes", "fixed")
    assert ctx2 == ctx and pieces(tok, cont) == ["▁yes"]
    # fixed: a context's trailing spaces move to the continuation before tokenising in context
    ctx3, cont3 = ev.encode_pair(tok, "Answer: ", "yes", "fixed")
    assert ctx3 == tok.encode("Answer:") and pieces(tok, cont3) == ["▁yes"]
    # in context means the tokens of context+continuation after the context's tokens
    ctx4, cont4 = ev.encode_pair(tok, "He said", " hello world", "fixed")
    assert ctx4 + cont4 == tok.encode("He said hello world")
    reqs = ev.task_requests("boolq", [PROMPT_CASES["boolq"][0]], tok, "legacy")
    assert [pieces(tok, c) for _, c in reqs[0].pairs] == [["▁", "▁no"], ["▁", "▁yes"]]
    with pytest.raises(ValueError, match="harness"):
        ev.encode_pair(tok, "a", " b", "v0.4")


def test_mmlu_has_bos_and_letter_in_context(llama_tok):
    dev = [{"question": "Q?", "subject": "anatomy", "choices": list("wxyz"), "answer": 1}] * 5
    req, = ev.task_requests("mmlu", [dict(dev[0], answer=2)], llama_tok, "legacy", dev=dev)
    assert all(ctx[0] == llama_tok.bos_id and pieces(llama_tok, cont) == [f"▁{l}"]
               for (ctx, cont), l in zip(req.pairs, "ABCD"))

# -- metrics ----------------------------------------------------------------------------------------------------------


def test_acc_norm_divides_by_characters():
    doc = ev.Doc(["q"] * 2, [" ab", " abcdef"], 0, ["ab", "abcdef"])
    req = ev.Request(doc, [])
    # raw: -4 > -6 picks "ab"; per character: -4/2 = -2 < -6/6 = -1 picks "abcdef" (not per token, not with the space)
    assert ev.metrics([req], [[-4.0, -6.0]]) == {"acc": 1.0, "acc_norm": 0.0}
    assert ev.metrics([req], [[-6.5, -6.0]]) == {"acc": 0.0, "acc_norm": 0.0}
    assert ev.metrics([req], [[-2.0, -2.0]])["acc"] == 1.0  # ties go to the first choice, as np.argmax
    boolq = ev.Request(ev.build_doc("boolq", PROMPT_CASES["boolq"][0]), [])
    assert ev.metrics([boolq], [[-1.0, -1.0]]) == {"acc": 0.0}  # (ll_yes > ll_no) == gold: a tie answers "no"
    assert ev.paper_average({t: {"acc": 0.5, "acc_norm": 0.25} for t in ev.ZERO_SHOT}) == pytest.approx(
        (4 * 0.5 + 3 * 0.25) / 7)

# -- perplexity and scoring against direct computations ---------------------------------------------------------------


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=100, max_seq_len=64)
    model = llama.Llama(llama.LlamaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # peaky distributions, so that choices differ clearly
    return model


@torch.no_grad()
def test_perplexity_equals_token_by_token():
    model, tok = tiny_model(), CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog; " * 3
    ids = tok.encode(text, bos=True)
    T = 16
    nll, n = 0.0, 0
    for w in range(len(ids) // T):  # each window alone, each token predicted from its own prefix in that window
        window = ids[w * T:(w + 1) * T]
        for t in range(1, T):
            logits = model(torch.tensor([window[:t]]))[0, -1]
            nll -= torch.log_softmax(logits.double(), -1)[window[t]].item()
            n += 1
    assert n == (len(ids) // T) * (T - 1)
    for batch_size in (1, 3):
        assert ev.perplexity(model, tok, text, T, batch_size) == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert ev.perplexity(model, tok, text, T, 2, limit=2) != pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="shorter than one window"):
        ev.perplexity(model, tok, "short", T)
    with pytest.raises(ValueError, match="maximum length"):
        ev.perplexity(model, tok, text, 128)


def random_requests(seed=0, n=23):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 100, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    reqs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # one context, multi-token choices (ARC, HellaSwag)
            ctx = ids(1, 30)
            pairs = [(ctx, ids(1, 8)) for _ in range(4)]
        elif kind == 1:  # contexts differ, continuation shared (WinoGrande)
            head, tail = ids(0, 10), ids(1, 6)
            pairs = [(head + ids(1, 3), tail) for _ in range(2)]
        elif kind == 2:  # single-token choices share one input (MMLU, BoolQ fixed)
            ctx = ids(1, 40)
            pairs = [(ctx, [t]) for t in (5, 6, 7, 8)]
        else:  # longer than the model's window: left truncation, differently per choice
            ctx = ids(60, 80)
            pairs = [(ctx, ids(1, 12)) for _ in range(3)]
        reqs.append(ev.Request(ev.Doc([""] * len(pairs), [""] * len(pairs), 0), pairs))
    return reqs


@pytest.mark.parametrize("gqa", [False, True])
def test_batched_scorer_equals_naive_loop(gqa):
    model = tiny_model(n_kv_heads=2 if gqa else 4)
    reqs = random_requests()
    naive = ev.score_requests_naive(model, reqs)
    for batch_size in (1, 5, 64):
        batched = ev.score_requests(model, reqs, batch_size)
        for a, b in zip(naive, batched):
            assert a == pytest.approx(b, abs=1e-4)
    # and under masks (the student's view), which the scorer must pass through
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    masks = llama.Masks(torch.rand(cfg.n_layers, cfg.n_heads, generator=g),
                        torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g),
                        (torch.rand(cfg.dim, generator=g) > 0.2).float())
    naive = ev.score_requests_naive(model, reqs, masks)
    assert naive != ev.score_requests_naive(model, reqs)
    for a, b in zip(naive, ev.score_requests(model, reqs, 7, masks)):
        assert a == pytest.approx(b, abs=1e-4)


def test_batched_scorer_shares_the_context():
    # positions run: the naive loop runs every choice's context again; the batched scorer once per item
    reqs = [r for r in random_requests(n=40) if len(r.pairs) == 4 and len(r.pairs[0][0]) < 60]
    naive, batched = ev.tokens_run(reqs, 4, 64)
    assert naive == sum(min(len(c + t), 65) - 1 for r in reqs for c, t in r.pairs)
    assert batched < 0.6 * naive


def test_split_rows_minimises_padding():
    assert ev._split_rows([5, 5, 5]) == [[0, 1, 2]]  # nothing to gain: one forward pass
    runs = ev._split_rows([3, 40, 4, 38, 2, 39], k=2)
    assert runs == [[1, 5, 3], [2, 0, 4]]  # longest first; 3*40 + 3*4 padded positions
    assert sorted(j for r in ev._split_rows(list(range(1, 30))) for j in r) == list(range(29))
    assert len(ev._split_rows(list(range(1, 30)))) == ev.MAX_SPLITS


# -- parity with an independent transformers computation on real task files ----------------------------------------

N_ITEMS, N_LEGACY, N_WINDOWS = 50, 20, 16
HF_TASKS = list(ev.ZERO_SHOT) + ["mmlu"]


def ref_doc(task, x):
    """The harness v0.3 prompts, written again independently of evaluate.py: (contexts, continuations, gold, norm)."""
    def pre(s):
        s = s.strip().replace(" [title]", ". ")
        import re
        return re.sub(r"\[.*?\]", "", s).replace("  ", " ")
    if task == "boolq":
        c = x["passage"] + "\nQuestion: " + x["question"] + "?\nAnswer:"
        return [c, c], [" no", " yes"], x["label"], None
    if task == "piqa":
        ch = [x["sol1"], x["sol2"]]
        return ["Question: " + x["goal"] + "\nAnswer:"] * 2, [" " + s for s in ch], x["label"], ch
    if task == "hellaswag":
        ch = [pre(e) for e in x["endings"]]
        q = pre(x["activity_label"] + ": " + x["ctx_a"] + " " + x["ctx_b"].capitalize())
        return [q] * 4, [" " + s for s in ch], int(x["label"]), ch
    if task == "winogrande":
        left, right = x["sentence"].split("_")
        return [left + x["option1"], left + x["option2"]], [" " + right.strip()] * 2, int(x["answer"]) - 1, None
    if task in ("arc_easy", "arc_challenge"):
        ch = x["choices"]["text"]
        return (["Question: " + x["question"] + "\nAnswer:"] * len(ch), [" " + s for s in ch],
                "ABCDE".index(x["answerKey"]), ch)
    if task == "openbookqa":
        ch = x["choices"]["text"]
        return [x["question_stem"]] * 4, [" " + s for s in ch], "ABCD".index(x["answerKey"]), ch


def ref_mmlu(dev, x):
    def block(d):
        return d["question"] + "\n" + "\n".join(f"{l}. {c}" for l, c in zip("ABCD", d["choices"])) + "\nAnswer:"
    shots = [d for d in dev if d["subject"] == x["subject"]][:5]
    subject = " ".join(x["subject"].split("_"))
    p = "The following are multiple choice questions (with answers) about " + subject + ".\n\n"
    p += "".join(block(d) + " " + "ABCD"[d["answer"]] + "\n\n" for d in shots) + block(x)
    return [p] * 4, [" A", " B", " C", " D"], x["answer"], None


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tok_path = need("llama_tokenizer", "tokenizer.model")
    for t in HF_TASKS[:-1] + ["mmlu_dev", "mmlu_test"]:
        need("tasks", f"{t}.jsonl")
    need("wikitext2", "wiki.test.raw"), need("ptb", "ptb.valid.txt")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=32000, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(folder)
    model, masks, tok, kind = ev.load_for_eval(folder, tok_path)
    assert masks is None and kind == "dense"
    scores = []  # every choice's log-likelihood as evaluate() computed it, in task order, for a finer comparison

    def spy(*args, **kwargs):
        scores.append(score_requests(*args, **kwargs))
        return scores[-1]
    score_requests = ev.score_requests
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "score_requests", spy)
        ours = {"fixed": ev.evaluate(model, tok, HF_TASKS, need(), limit=N_ITEMS),
                "ppl": ev.evaluate(model, tok, ["wikitext2", "ptb"], need(), seq_len=128, limit=N_WINDOWS),
                # MMLU ignores --harness (it always scores the letter in context): legacy needs the zero-shot tasks only
                "legacy": ev.evaluate(model, tok, list(ev.ZERO_SHOT), need(), limit=N_LEGACY, harness="legacy")}
    ours["scores"] = {("fixed", t): s for t, s in zip(HF_TASKS, scores)}
    ours["scores"].update({("legacy", t): s for t, s in zip(ev.ZERO_SHOT, scores[len(HF_TASKS):])})
    return hf, tok.sp, ours


def ref_score(hf, sp, contexts, continuations, harness, bos, memo):
    out = []
    for ctx, cont in zip(contexts, continuations):
        pre = [1] if bos else []
        if harness == "fixed":
            whole = pre + sp.encode(ctx + cont)
            n_ctx = len(pre + sp.encode(ctx))
        else:
            whole = pre + sp.encode(ctx) + sp.encode(cont)
            n_ctx = len(whole) - len(sp.encode(cont))
        key = tuple(whole[:-1])
        if key not in memo:  # MMLU's four choices share one input: one forward pass, as a person would write it
            with torch.no_grad():
                memo.clear()
                memo[key] = hf(torch.tensor([whole[:-1]])).logits[0]
        logits = memo[key]
        out.append(sum(torch.log_softmax(logits[i - 1].double(), -1)[whole[i]].item()
                       for i in range(n_ctx, len(whole))))
    return out


@pytest.mark.parametrize("harness", ["fixed", "legacy"])
@pytest.mark.parametrize("task", HF_TASKS)
def test_tasks_match_transformers(hf_run, task, harness):
    hf, sp, ours = hf_run
    if task == "mmlu" and harness == "legacy":
        pytest.skip("MMLU has one tokenisation")
    n = N_ITEMS if harness == "fixed" else N_LEGACY
    if task == "mmlu":
        dev = [json.loads(l) for l in need("tasks", "mmlu_dev.jsonl").read_text().splitlines()]
        items = [json.loads(l) for l in need("tasks", "mmlu_test.jsonl").open().readlines()[:n]]
        docs = [ref_mmlu(dev, x) for x in items]
    else:
        items = [json.loads(l) for l in need("tasks", f"{task}.jsonl").open().readlines()[:n]]
        docs = [ref_doc(task, x) for x in items]
    acc = norm = 0
    memo = {}
    for (contexts, conts, gold, choices), mine in zip(docs, ours["scores"][harness, task], strict=True):
        s = ref_score(hf, sp, contexts, conts, "fixed" if task == "mmlu" else harness, task == "mmlu", memo)
        assert mine == pytest.approx(s, rel=1e-5, abs=1e-3)
        acc += max(range(len(s)), key=lambda i: (s[i], -i)) == gold
        if choices:
            s = [v / len(c) for v, c in zip(s, choices)]
            norm += max(range(len(s)), key=lambda i: (s[i], -i)) == gold
    res = ours[harness]
    assert res["meta"]["items"][task] == n
    assert res[task]["acc"] == acc / n
    if docs[0][3] is not None:
        assert res[task]["acc_norm"] == norm / n
    else:
        assert "acc_norm" not in res[task]


@pytest.mark.parametrize("task", ["wikitext2", "ptb"])
def test_perplexity_matches_transformers(hf_run, task):
    hf, sp, ours = hf_run
    text = data.wikitext2_text(need("wikitext2", "wiki.test.raw")) if task == "wikitext2" else data.ptb_text(
        need("ptb", "ptb.valid.txt"))
    ids = torch.tensor([1] + sp.encode(text))[:N_WINDOWS * 128].view(N_WINDOWS, 128)  # BOS once, then windows
    nll = 0.0
    with torch.no_grad():
        for w in ids:
            nll += F.cross_entropy(hf(w[None]).logits[0, :-1], w[1:], reduction="sum").item()
    assert ours["ppl"][task]["ppl"] == pytest.approx(math.exp(nll / (N_WINDOWS * 127)), rel=1e-4)
    assert ours["ppl"]["meta"]["items"][task] == N_WINDOWS and ours["ppl"]["meta"]["seq_len"] == 128


def test_average_and_table(hf_run):
    res = {**hf_run[2]["fixed"], **{t: hf_run[2]["ppl"][t] for t in ("wikitext2", "ptb")}}
    assert res["average"]["acc"] == pytest.approx(sum(res[t][ev.PAPER_METRIC[t]] for t in ev.ZERO_SHOT) / 7)
    assert set(res["meta"]["mmlu_subjects"]) == {"abstract_algebra"}
    head, _, row = ev.format_table(res, "tiny").splitlines()[:3]  # the paper's Tables 1-2 in one row
    assert [c.strip() for c in head.split("|")[1:-1]] == [  # each column names its metric, as the paper's mix
        "Model", "WikiText2 PPL", "PTB PPL", "BoolQ acc", "PIQA acc", "HellaSwag acc_norm", "WinoGrande acc",
        "ARC-e acc", "ARC-c acc_norm", "OBQA acc_norm", "Average", "MMLU acc"]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == f"{res['wikitext2']['ppl']:.2f}" and cells[5] == f"{100 * res['hellaswag']['acc_norm']:.2f}"
    assert cells[3] == f"{100 * res['boolq']['acc']:.2f}"
    assert cells[8] == f"{100 * res['arc_challenge']['acc_norm']:.2f}"
    assert cells[10] == f"{100 * res['average']['acc']:.2f}"
    assert res["meta"]["overrides"] == {} and "--path" not in ev.format_table(res, "tiny")
    assert hf_run[2]["ppl"]["meta"]["files"] == {"wikitext2": str(need("wikitext2", "wiki.test.raw")),
                                                 "ptb": str(need("ptb", "ptb.valid.txt"))}


def test_table_names_the_file_that_replaced_a_data_set(tmp_path):
    """--path wikitext2=OTHER: the column names OTHER, not WikiText2; a --path to the standard file is no override."""
    model = tiny_llama(**GQA)
    tok = CharTokenizer(vocab_size=64)
    other = tmp_path / "heldout.txt"
    other.write_text("Once upon a time there was a cat.\n\nThe cat sat on the mat. " * 40)
    arc = tmp_path / "my_arc.jsonl"
    arc.write_text("\n".join(json.dumps({"id": str(i), "question": "Which is a mammal?", "answerKey": "B",
                                         "choices": {"text": ["shark", "whale"], "label": ["A", "B"]}})
                               for i in range(3)) + "\n")
    std = tmp_path / "data" / "wikitext2" / "wiki.test.raw"
    std.parent.mkdir(parents=True)
    std.write_text(other.read_text())

    res = ev.evaluate(model, tok, ["wikitext2", "arc_challenge"], tmp_path / "data", seq_len=32,
                      paths={"wikitext2": str(other), "arc_challenge": str(arc)})
    assert res["meta"]["overrides"] == {"wikitext2": str(other), "arc_challenge": str(arc)}
    table = ev.format_table(res, "tiny")
    head = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert head == ["Model", "heldout.txt PPL", "my_arc.jsonl acc_norm"]
    assert "WikiText2" not in table and "ARC-c" not in table
    assert f"wikitext2: read from {other} (--path)" in table

    same = ev.evaluate(model, tok, ["wikitext2"], tmp_path / "data", seq_len=32, paths={"wikitext2": str(std)})
    assert same["meta"]["overrides"] == {} and same["wikitext2"] == res["wikitext2"]
    assert ev.format_table(same).splitlines()[0].split("|")[2].strip() == "WikiText2 PPL"

# -- checkpoints: exported pruned model == masked model; nuteprune output directories -------------------------------


@pytest.fixture(scope="module")
def stories():
    model, tok = checkpoint.load(need("stories260K", "stories260K.bin"), need("stories260K", "tok512.model"))
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    head = (torch.rand(cfg.n_layers, cfg.n_heads, generator=g) > 0.3).float() * 0.97
    masks = llama.Masks(head, (torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g) > 0.4).float(),
                        (torch.rand(cfg.dim, generator=g) > 0.2).float())
    return model, tok, masks


def test_pruned_export_equals_masked_model(stories, tmp_path):
    model, tok, masks = stories
    tasks = ["wikitext2", "arc_easy", "winogrande", "hellaswag"]
    kw = dict(seq_len=256, limit=12, batch_size=4)
    masked = ev.evaluate(model, tok, tasks, need(), masks=masks, **kw)
    checkpoint.export_pruned(model, masks, tmp_path / "export", tokenizer=tok)
    pruned, m, tok2, kind = ev.load_for_eval(tmp_path / "export")
    assert m is None and kind == "pruned"
    exported = ev.evaluate(pruned, tok2, tasks, need(), **kw)
    assert exported["wikitext2"]["ppl"] == pytest.approx(masked["wikitext2"]["ppl"], rel=1e-4)
    for t in tasks[1:]:
        assert exported[t] == masked[t]
    assert masked["wikitext2"] != ev.evaluate(model, tok, ["wikitext2"], need(), **kw)["wikitext2"]


def test_nuteprune_run_directory(stories, tmp_path, capsys):
    """A run directory is evaluated through its exported pruned/ (equal to the masked model); an unfinished run is a
    one-line error."""
    model, tok, masks = stories
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"")
    assert ev.main(["--ckpt", str(run), "--data-dir", str(need()), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    checkpoint.export_pruned(model, masks, run / "pruned", tokenizer=tok)
    out = tmp_path / "r.json"
    argv = ["--ckpt", str(run), "--data-dir", str(need()), "--tasks", "arc_easy,wikitext2", "--limit", "6"]
    assert ev.main(argv + ["--seq-len", "4096"]) == 2  # beyond the model's 512 positions: an error, not a cap
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-len 4096 is out of range" in err[0]
    rc = ev.main(argv + ["--json", str(out)])  # the default 2048 becomes the model's maximum, with a note
    assert rc == 0
    res = json.loads(out.read_text())
    direct = ev.evaluate(model, tok, ["arc_easy", "wikitext2"], need(), masks=masks, seq_len=512, limit=6)
    assert res["arc_easy"] == direct["arc_easy"]
    assert res["wikitext2"]["ppl"] == pytest.approx(direct["wikitext2"]["ppl"], rel=1e-4)
    meta = res["meta"]
    assert meta["kind"] == "nuteprune-run" and meta["checkpoint"] == str(run)
    assert meta["seq_len"] == 512  # the model's maximum
    assert meta["items"] == {"arc_easy": 6, "wikitext2": 6} and meta["protocol"]["harness"] == "fixed"
    assert set(res) == {"arc_easy", "wikitext2", "meta"}
    err = capsys.readouterr().err
    assert "the model's maximum" in err and "ETA" in err


def test_real_nuteprune_run_equals_its_masked_model(tmp_path):
    """evaluate.py on a real run directory (its export) gives the numbers of the base model with the run's LoRA and
    final masks."""
    npr = pytest.importorskip("nuteprune")
    out = tmp_path / "run"
    npr.main(["--ckpt", str(need("stories260K", "stories260K.bin")), "--tokenizer",
              str(need("stories260K", "tok512.model")), "--data", str(need("tinystories", "tinystories_val.txt")),
              "--target", "0.3", "--out", str(out), "--n-docs", "200", "--block-size", "64", "--batch-size", "4",
              "--micro-batch-size", "4", "--heldout-blocks", "2", "--max-steps", "4",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    tasks = ["wikitext2", "arc_easy", "winogrande", "hellaswag"]
    assert ev.main(["--ckpt", str(out), "--data-dir", str(need()), "--tasks", ",".join(tasks), "--limit", "12",
                    "--seq-len", "128", "--json", str(tmp_path / "r.json")]) == 0
    export = json.loads((tmp_path / "r.json").read_text())
    model, masks, tok = npr.load_run(out)
    masked = ev.evaluate(model, tok, tasks, need(), masks=masks, seq_len=128, limit=12)
    assert export["meta"]["kind"] == "nuteprune-run"
    assert export["wikitext2"]["ppl"] == pytest.approx(masked["wikitext2"]["ppl"], rel=1e-4)
    for t in tasks[1:]:
        assert export[t] == masked[t]

# -- the command line -------------------------------------------------------------------------------------------------


def test_cli_user_errors(tmp_path, capsys):
    ckpt = str(need("stories260K", "stories260K.bin"))
    cases = [["--ckpt", str(tmp_path / "missing"), "--data-dir", str(tmp_path)],  # no such checkpoint
             ["--ckpt", ckpt, "--tasks", "boolq,copa", "--data-dir", str(tmp_path)],  # unknown task
             ["--ckpt", ckpt, "--tasks", "boolq", "--data-dir", str(tmp_path)],  # no task file
             ["--ckpt", ckpt, "--tasks", "boolq", "--path", "boolq"],  # malformed override
             ["--ckpt", ckpt, "--tasks", "boolq", "--limit", "0"]]
    for argv in cases:
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
