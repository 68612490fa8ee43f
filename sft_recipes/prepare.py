"""Records -> chat-formatted, tokenized, length-audited `datasets.Dataset` rows, cached on disk.

We tokenize ourselves instead of letting TRL do it, so that the length audit, the overlong policy and the
dry-run display see exactly the tokens that are trained, and nothing is dropped without being counted.
Each row is `input_ids` + `labels` (-100 on the prompt): the loss falls on the answer and on the
end-of-turn token that closes it (in a conversation, on every reply, in one row or each in a row of its own, or
on the last: data.train_replies). TRL trains on such rows as they are.

Two ways to the same tokens. The reference: render each conversation with the chat template (Jinja) and
tokenize it whole, taking the prompt/answer boundary from character offsets. The fast way, used when it is
proven equal: render the template once around placeholder texts to find its constant pieces, tokenize
those once, and tokenize only each record's question and answer. It is checked token for token against the
reference on a spread sample of records (any difference, and the reference is used for all); records whose
texts start or end with whitespace, where tokens could merge across a piece boundary, and chat transcripts of
several exchanges or with a system message of their own always take the reference.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from jinja2.exceptions import TemplateError

from . import __version__
from .data import MAX_LISTED, Record
from .errors import UserError
from .templates import Template, refusals

U, A = "\ue000USER\ue000", "\ue000ANSWER\ue000"  # placeholders (private-use characters)
VERIFY_SAMPLE = 256
REASONING_END = "</think>"  # the end of a reasoning block (Qwen3, DeepSeek-R1's distills, SmolLM3)


@dataclass
class Stats:
    records: int = 0
    rows: int = 0  # the records, or with data.train_replies=each a row per trained reply
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    over_max_length: int = 0
    lengths: List[int] = field(default_factory=list)  # tokens per record before truncation
    trained_tokens: int = 0
    fast_path: bool = False
    # records dropped under data.overlong=truncate because the prompt alone fills max_length, and where the first are
    question_too_long: int = 0
    question_too_long_at: List[str] = field(default_factory=list)  # "FILE, record N: P prompt tokens"
    conversations: int = 0  # kept records of several exchanges (chat transcripts)
    first_conversation: int = -1  # the row of the first (what the dry run shows)
    train_replies: str = "all"  # of a conversation: all, each (a row per reply) or the last (data.train_replies)

    def percentile(self, q: float) -> int:
        s = sorted(self.lengths)
        return s[min(len(s) - 1, int(q * len(s)))] if s else 0

    def summary(self) -> Dict[str, int]:
        return {"records": self.records, "rows": self.rows, "kept": self.kept, "tokens_p50": self.percentile(0.5),
                "tokens_p90": self.percentile(0.9), "tokens_p99": self.percentile(0.99),
                "tokens_max": max(self.lengths, default=0), "over_max_length": self.over_max_length,
                "truncated": self.truncated, "dropped": self.dropped, "trained_tokens": self.trained_tokens,
                "conversations": self.conversations}


def turn_end(tokenizer) -> Optional[str]:
    """The special token that ends a reply in the tokenizer's chat template (<|im_end|>, <|eot_id|>, <end_of_turn>):
    where training ends each reply and generation stops. It is not always the tokenizer's eos_token (Gemma's is
    <eos>, a Qwen base model's <|endoftext|>); that is the answer where the template puts no special token there."""
    try:
        full = tokenizer.apply_chat_template([{"role": "user", "content": U}, {"role": "assistant", "content": A}],
                                             tokenize=False)
    except Exception:  # (a template that wants other turns: the tokenizer's eos_token)
        return tokenizer.eos_token
    after = tokenizer(full[full.rfind(A) + len(A):], add_special_tokens=False)["input_ids"][:1]
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return tokenizer.convert_ids_to_tokens(after[0]) if after and after[0] in specials else tokenizer.eos_token


def stop_ids(tokenizer, model=None) -> List[int]:
    """The token ids that end an answer: the template's end of turn, the tokenizer's eos_token and the model's
    generation_config's (several for Llama 3 and Gemma). generate() given eos_token_id takes those alone."""
    ids = [tokenizer.convert_tokens_to_ids(end) if (end := turn_end(tokenizer)) else None, tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def reasoning_end(tokenizer) -> Optional[str]:
    """"</think>" where the chat template writes a reasoning block before the reply (Qwen3's writes
    "<think>\\n\\n</think>\\n\\n" before each answer that has none, and trains it): a model fine-tuned on plain answers
    writes that empty block first. It is no part of the answer that chat shows or evaluate scores."""
    template = getattr(tokenizer, "chat_template", None)
    return REASONING_END if REASONING_END in str(template or "") else None


def thinking_off(tokenizer) -> dict:
    """apply_chat_template's arguments that ask for an answer without reasoning where the chat template has that
    switch (Qwen3's `enable_thinking=False` puts an empty reasoning block in the prompt); else none. A base model that
    reasons first spends evaluate's max_new_tokens on its reasoning, so its answers would be cut before they begin."""
    return {"enable_thinking": False} if "enable_thinking" in str(getattr(tokenizer, "chat_template", "") or "") else {}


def answer_of(reply: str, end: Optional[str]) -> str:
    """A reply without its reasoning block (what follows `end`, from reasoning_end), where it has one."""
    return reply.rpartition(end)[2].strip() if end and end in reply else reply


class Renderer:
    """Turns records into input_ids, the tokens before the first trained reply, and the untrained tokens between a
    conversation's trained replies, through a template and a tokenizer."""

    def __init__(self, tokenizer, template: Template, system_prompt: Optional[str] = None):
        self.tok, self.template, self.system_prompt = tokenizer, template, system_prompt
        self.end = turn_end(tokenizer)
        self.pieces = self._find_pieces()

    def _messages(self, r: Record) -> List[dict]:
        system = r.system if r.system is not None else self.system_prompt  # (a chat transcript's own)
        return self.template.messages(r.as_dict(), system, r.history_messages())

    def _find_pieces(self) -> Optional[Tuple[str, str, str, str, str]]:
        """(head, user_lead, middle, lead, tail) such that full text = head + user_lead + user + middle + lead + answer
        + tail and the prompt ends after middle, if the template renders placeholders that way; None otherwise. The
        leads are spaces before the user's text (`plain`'s "User: ") and what the answer's turn puts before it (its
        space after "Assistant:", Qwen3's empty reasoning block), each tokenized with the text after it, as the
        tokenizer joins them."""
        sys_msgs = self.template.messages({}, self.system_prompt)[:-1]
        with refusals(f"the prompt of data.template={self.template.name}" + (
                f" with the system prompt {sys_msgs[0]['content']!r}" if sys_msgs else ""), sys_msgs):
            prompt = self.tok.apply_chat_template(sys_msgs + [{"role": "user", "content": U}],
                                                  add_generation_prompt=True, tokenize=False)
            full = self.tok.apply_chat_template(sys_msgs + [{"role": "user", "content": U},
                                                            {"role": "assistant", "content": A}], tokenize=False)
        rest = full[len(prompt):]
        if prompt.count(U) != 1 or not full.startswith(prompt) or A not in rest:
            return None
        head, middle = prompt.split(U)
        lead = rest[:rest.index(A)]
        return head.rstrip(" "), head[len(head.rstrip(" ")):], middle, lead, self._end_at_eos(
            rest[len(lead) + len(A):])

    def _end_at_eos(self, text: str) -> str:
        """The trained text ends at the end-of-turn token: what follows it (a newline) is never generated."""
        end, stripped = self.end, text.rstrip()
        return stripped if end and stripped.endswith(end) else text

    def reference(self, records: Sequence[Record]) -> Tuple[List[List[int]], List[int], List[list]]:
        """Render with Jinja and tokenize each conversation whole. Each trained reply is trained from where its prompt
        ends (the conversation up to its user turn, with the generation prompt) through its end-of-turn token, found
        by character offsets (a reply with the weight 0 is not). Returns input_ids, the tokens before the first
        trained reply, and the (start, end) tokens between trained replies (user turns, untrained replies)."""
        convs = [self._messages(r) + [{"role": "assistant", "content": r.answer}] for r in records]
        trained = [[i for n, i in enumerate(j for j, m in enumerate(c) if m["role"] == "assistant")
                    if n not in r.untrained] for r, c in zip(records, convs)]
        render = lambda cs, **kw: self.tok.apply_chat_template(cs, tokenize=False, **kw)  # noqa: E731
        try:
            prompts = iter(render([c[:i] for c, ts in zip(convs, trained) for i in ts], add_generation_prompt=True))
            ends = iter(map(self._end_at_eos, render([c[:i + 1] for c, ts in zip(convs, trained) for i in ts])))
        except TemplateError:  # which record's messages did the chat template refuse?
            for r, c in zip(records, convs):
                with refusals(f"the messages of {r.where}", c):
                    render([c])
            raise
        texts, bounds = [], []  # bounds: each trained reply's (start, end) characters
        for r, c, ts in zip(records, convs, trained):
            pairs = [(next(prompts), next(ends)) for _ in ts]
            text = pairs[-1][1] if ts[-1] == len(c) - 1 else self._end_at_eos(render([c])[0])  # (an untrained last)
            if odd := next((x for pair in pairs for x in pair if not text.startswith(x)), None):
                last = (" (data.train_replies=each trains every reply in a row of its own, after the conversation "
                        "before it as chat sends it)" if r.history else "")
                why = (f" (it writes a reasoning block, {REASONING_END}, before the last reply alone, as Qwen3's "
                       "does, and none before the earlier ones)" if r.history and reasoning_end(self.tok) else "")
                at = len(os.path.commonprefix([odd, text]))
                around = lambda t: t[max(0, at - 20):at + 20]  # noqa: E731
                raise UserError(f"Template '{self.template.name}' renders the prompt of {r.where} differently "
                                f"alone than inside the conversation{why}: alone it reads {around(odd)!r} "
                                f"where the conversation reads {around(text)!r}, so training would not "
                                f"match inference; fix its chat_template{last}.")
            texts.append(text)
            bounds.append([(len(p), len(e)) for p, e in pairs])
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        n_prompt, gaps = [], []
        for text, offsets, b in zip(texts, enc["offset_mapping"], bounds):
            starts = [s for s, _ in offsets]
            at = lambda char: bisect.bisect_left(starts, char)  # noqa: E731  the first token from that character on
            between = zip([end for _, end in b], [start for start, _ in b[1:]] + [len(text)])  # (+ an untrained last)
            n_prompt.append(at(b[0][0]))
            gaps.append([(at(end), at(start)) for end, start in between if end < start])
        return enc["input_ids"], n_prompt, gaps

    def fast(self, records: Sequence[Record]) -> Tuple[List[List[int]], List[int]]:
        head, user_lead, middle, lead, tail = self.pieces
        enc = lambda texts: self.tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        h, m, t = enc([head, middle, tail])
        users = enc([user_lead + self._messages(r)[-1]["content"] for r in records])
        answers = enc([lead + r.answer for r in records])
        ids = [h + u + m + a + t for u, a in zip(users, answers)]
        return ids, [len(h) + len(u) + len(m) for u in users]

    def __call__(self, records: Sequence[Record]):
        """(input_ids, prompt lengths, untrained gaps between replies, fast path used) for every record."""
        edge = lambda t: t[:1].isspace() or t[-1:].isspace()  # noqa: E731  tokens may merge across pieces
        whole = [i for i, r in enumerate(records)  # (the pieces hold the run's system prompt and no earlier turns)
                 if r.history or r.system is not None or edge(r.question) or edge(r.answer)]
        if self.pieces is None or len(whole) == len(records):  # (chat transcripts alone, say)
            return (*self.reference(records), False)
        ids, n_prompt = self.fast(records)
        gaps = [[] for _ in records]
        step, skip = max(1, len(records) // VERIFY_SAMPLE), set(whole)
        sample = [i for i in range(0, len(records), step) if i not in skip]
        ref_ids, ref_n, ref_gaps = self.reference([records[i] for i in sample + whole])
        if any(ids[i] != ri or n_prompt[i] != rn for i, ri, rn in zip(sample, ref_ids, ref_n)):
            return (*self.reference(records), False)
        for k, i in enumerate(whole, len(sample)):
            ids[i], n_prompt[i], gaps[i] = ref_ids[k], ref_n[k], ref_gaps[k]
        return ids, n_prompt, gaps, True


def last_replies(records: Sequence[Record]) -> List[Record]:
    """data.train_replies=last: each conversation trains on its last reply alone; the earlier ones are its context."""
    out = []
    for r in records:
        if r.history and len(r.history) in r.untrained:
            raise UserError(f"{r.where}: its last reply has the weight 0, and with data.train_replies=last no other "
                            "reply trains; give it the weight 1, leave the record out, or set data.train_replies=all.")
        out.append(replace(r, untrained=tuple(range(len(r.history)))) if r.history else r)
    return out


def each_reply(records: Sequence[Record]) -> List[Record]:
    """data.train_replies=each: a conversation becomes a row per trained reply, each ending with that reply, which
    alone trains, after the conversation before it (rendered as chat sends it: a template that renders earlier
    replies otherwise than the last, as Qwen3's drops their reasoning block, trains every reply so)."""
    out = []
    for r in records:
        turns = r.history + ((r.question, r.answer),)
        out += [replace(r, question=q, answer=a, history=turns[:n], untrained=tuple(range(n)),
                        where=r.where if n == len(r.history) else f"{r.where} (reply {n + 1})")
                for n, (q, a) in enumerate(turns) if n not in r.untrained]
    return out


def tokenize(records: Sequence[Record], tokenizer, template: Template, max_length: int,
             overlong: str = "truncate", system_prompt: Optional[str] = None, replies: str = "all"):
    """Tokenize records into a Dataset of input_ids/labels, applying the overlong policy; `replies` is
    data.train_replies (all | each | last). Returns (dataset, stats); stats count records, and the rows kept."""
    import numpy as np

    stats = Stats(records=len(records), train_replies=replies)
    conversations = sum(bool(r.history) for r in records)
    records = {"last": last_replies, "each": each_reply}.get(replies, list)(records)
    stats.rows = len(records)
    ids_list, n_prompt_list, gaps_list, stats.fast_path = Renderer(tokenizer, template, system_prompt)(records)
    stats.lengths = [len(ids) for ids in ids_list]
    rows_ids, kept_n_prompt, kept_gaps, overlong_where = [], [], [], []
    for r, ids, n_prompt, gaps in zip(records, ids_list, n_prompt_list, gaps_list):
        if len(ids) > max_length:
            stats.over_max_length += 1
            overlong_where.append(r.where)
            if overlong == "drop" or n_prompt >= max_length - 1:  # never cut the question
                stats.dropped += 1
                if overlong != "drop":
                    stats.question_too_long += 1
                    if len(stats.question_too_long_at) < MAX_LISTED:
                        stats.question_too_long_at.append(f"{r.where}: {n_prompt} prompt tokens")
                continue
            stats.truncated += 1
            ids = ids[:max_length]
        if r.history:
            stats.conversations += 1
            stats.first_conversation = len(rows_ids) if stats.first_conversation < 0 else stats.first_conversation
        rows_ids.append(ids)
        kept_n_prompt.append(n_prompt)
        kept_gaps.append(gaps)
    if overlong == "error" and overlong_where:
        raise UserError(f"{len(overlong_where)} record(s) exceed data.max_length={max_length} tokens: "
                        f"{'; '.join(overlong_where[:MAX_LISTED])}. Raise data.max_length, or set "
                        "data.overlong=truncate (cut the answer) or data.overlong=drop.")
    stats.kept = len(rows_ids)
    if replies == "each":  # (a conversation's first reply is a row without history)
        stats.conversations = conversations
    if not stats.kept:
        files = ", ".join(sorted({r.where.rsplit(", ", 1)[0] for r in records if r.where})) or "the data"
        why = (f"data.overlong=drop left out all {len(records)} (the shortest has {min(stats.lengths)} tokens); raise "
               "data.max_length, or set data.overlong=truncate (cut the answer)" if overlong == "drop" else
               f"every question alone is longer ({'; '.join(stats.question_too_long_at)}); raise data.max_length")
        raise UserError(f"No record of {files} fits data.max_length={max_length}: {why}.")
    lengths = np.fromiter((len(x) for x in rows_ids), dtype=np.int64, count=len(rows_ids))
    dataset, stats.trained_tokens = _to_dataset(rows_ids, lengths, np.asarray(kept_n_prompt), kept_gaps)
    return dataset, stats


def special_token_text(records: Sequence[Record], tokenizer) -> Optional[str]:
    """Text in the records that the tokenizer reads as one of its special tokens, not as text: '<|im_end|>' inside an
    answer teaches the model to end its turn there (data exported from chat logs, say)."""
    import re

    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(
        tokenizer.all_special_tokens)
    pattern = re.compile("|".join(map(re.escape, sorted(filter(None, specials), key=len, reverse=True))))
    fields = lambda r: [("question", r.question), ("answer", r.answer), ("source", r.source)] + [  # noqa: E731
        (f"earlier turn {n}", text) for n, text in enumerate((t for pair in r.history for t in pair), 1)]
    found = [f"{r.where}, {name}: {m.group()!r}" for r in records for name, text in fields(r)
             if (m := pattern.search(text))]
    if not found:
        return None
    return (f"{len(found)} field(s) hold text that the tokenizer reads as one of its special tokens, not as text "
            f"({'; '.join(found[:5])}{'; ...' if len(found) > 5 else ''}): the model trains on that token there (an "
            "end-of-turn token inside an answer teaches it to stop there). Remove or rewrite that text.")


TRUNCATED_WARN = 0.05  # the share of cut training answers that earns a warning


def truncation_warning(stats: Stats, max_length: int) -> str:
    """Many answers cut: the model never sees how they end (nor the end-of-turn token that closes them)."""
    p99, longest = stats.percentile(0.99), max(stats.lengths)
    fits = (f"data.max_length={p99} keeps 99 % whole, {longest} all" if p99 < longest else
            f"data.max_length={longest} keeps them all")
    return (f"{stats.truncated} of {stats.rows} training answers ({100 * stats.truncated / stats.rows:.0f} %) "
            f"are cut at data.max_length={max_length} tokens: the model learns them without their end (and the "
            f"end-of-turn token that closes them); {fits} (or data.overlong=drop leaves them out).")


def _to_dataset(rows_ids: List[List[int]], lengths, n_prompt, gaps: List[list]):
    """input_ids and labels columns built as Arrow list arrays straight from numpy (fast for 100k rows); labels are
    -100 before n_prompt and in each row's gaps. Returns (dataset, trained tokens)."""
    import itertools

    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    offsets = np.zeros(len(rows_ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = flat.astype(np.int64)
    position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    labels[position < np.repeat(n_prompt, lengths)] = -100
    for row in (i for i, g in enumerate(gaps) if g):  # a conversation's user turns between its replies
        for start, end in gaps[row]:
            labels[offsets[row] + min(start, lengths[row]):offsets[row] + min(end, lengths[row])] = -100
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int64))),
                      "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels))})
    return Dataset(table), int((labels != -100).sum())


MARKS = ((">>>", "<<<"), ("[[[", "]]]"), ("{{{", "}}}"), ("\u27e6", "\u27e7"))  # the last: ⟦ ⟧


def marks(rows: List[dict], tokenizer) -> Tuple[str, str]:
    """The marks around trained spans for show_example: >>> and <<<, unless the rows' text holds one of them (a
    Python doctest in an answer), then the first pair it holds neither of."""
    text = "".join(tokenizer.decode(row["input_ids"]) for row in rows)
    return next((m for m in MARKS if m[0] not in text and m[1] not in text), MARKS[-1])


def show_example(row: dict, tokenizer, around: Tuple[str, str] = MARKS[0]) -> str:
    """Decode one training row with each trained span (the tokens that carry loss) between the marks `around`."""
    import itertools

    ids, labels, text, at = row["input_ids"], row["labels"], "", 0
    for trained, span in itertools.groupby(labels, key=lambda lab: lab != -100):
        n = len(list(span))
        piece = tokenizer.decode(ids[at:at + n])
        text, at = text + (f"{around[0]}{piece}{around[1]}" if trained else piece), at + n
    return text


# ---- the whole preparation, cached ------------------------------------------------------------------------

@dataclass
class Options:
    """What shapes the prepared rows (see DataConfig for each field's meaning)."""
    max_length: int = 1024
    overlong: str = "truncate"
    train_replies: str = "all"
    dedup: bool = True
    val_fraction: float = 0.0
    split_by: str = "record"
    seed: int = 42
    system_prompt: Optional[str] = None
    columns: Optional[dict] = None  # data.columns (sft_recipes.data.load_records)
    cache_dir: Optional[str] = None  # None: no cache


@dataclass
class Prepared:
    train: object  # datasets.Dataset
    val: object  # datasets.Dataset or None
    train_stats: Stats
    val_stats: Optional[Stats]
    report: dict  # files, duplicates, leaks, warnings: what data_report.md and the dry run show
    from_cache: bool = False
    digest: str = ""  # data_digest of the files: a resumed run compares it with its checkpoint's


def load_and_split(train_spec, val_spec, opts: Options, reports=None):
    """(train records, validation records, DedupReport or None): the records a run trains and validates on."""
    from .data import dedup, load_many, split

    train_records = load_many(train_spec, opts.columns, reports)
    val_records = load_many(val_spec, opts.columns, reports) if val_spec else []
    dup = None
    if opts.dedup:
        train_records, dup = dedup(train_records)
    if not val_spec:
        train_records, val_records = split(train_records, opts.val_fraction, opts.seed, opts.split_by)
    return train_records, val_records, dup


def own_system_prompts(records, system: Optional[str]) -> Optional[str]:
    """Chat transcripts may hold a system message, which their record trains with. Where it is not the run's system
    prompt (data.system_prompt, else the template's: what chat and the model card use, and evaluate for questions
    without one of their own), a warning says so."""
    if not (other := [r for r in records if r.system is not None and (r.system or None) != (system or None)]):
        return None
    texts = list(dict.fromkeys(r.system for r in other))
    now = "the run's system prompt" + (f", {system!r}" if system else " (unset: the template's default)")
    every = {r.system for r in records if r.system is not None}
    fix = (f"; 'data.system_prompt=\"{texts[0]}\"' makes it the run's" if len(every) == 1 and '"' not in texts[0]
           and "\n" not in texts[0] else "")
    return (f"{len(other)} record(s) hold a system message other than {now}: {len(texts)} different, the first "
            f"{texts[0][:200]!r} ({other[0].where}). Each trains with its own; chat and the model card use the "
            f"run's{fix}")


def prompt_joins_answer(tokenizer, template: Template, system: Optional[str]) -> Optional[str]:
    """A prompt that ends where the tokenizer joins it to the answer's first word: "Assistant: " (with the space)
    before "The" is tokenized with " The" as one token, which starts in the prompt. Training then never trains that
    token and never sees the prompt end as inference tokenizes it (a lone " "), on every record."""
    question = "What is it?"
    msgs = template.messages({"question": question}, system)
    render = lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=False, **kw)  # noqa: E731
    try:
        prompt = render(msgs, add_generation_prompt=True)
        fulls = [render(msgs + [{"role": "assistant", "content": answer}]) for answer in ("The", "A", "Yes", "1")]
    except TemplateError:  # (tokenize names what the chat template refuses, and the way out)
        return None
    for full in fulls:
        if not full.startswith(prompt):  # (tokenize names a template that renders its prompt otherwise)
            return None
        spans = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if joined := next((full[a:b] for a, b in spans if a < len(prompt) < b), None):
            end = prompt.rsplit(question, 1)[-1][-20:]  # (what follows the question)
            return (f"data.template={template.name}: its prompt ends in {end!r}, which the tokenizer joins "
                    f"to the answer's first word ({joined!r} is one token): no answer's first token is trained, and "
                    "at inference the prompt ends in a token that training never saw. Let the chat template's "
                    "generation prompt end before that text, and put it at the start of the assistant's turn.")
    return None


def unsourced_prompts(records, template: Template) -> Optional[str]:
    """A template that names the source in the prompt ({source}), with records that have none: their prompts name an
    empty one ("Source: " and nothing after it)."""
    if "{source}" not in template.user or not (unsourced := sum(not r.source for r in records)):
        return None
    which = "no record has one" if unsourced == len(records) else f"{unsourced} of {len(records)} records have none"
    return (f"data.template={template.name} names the source in each prompt, but {which}: their prompts name an empty "
            "source. Give them a source field (data.columns.source=NAME for another name), or use a template without "
            "{source} (data.template=chat).")


def prepare(train_spec, val_spec, tokenizer, template: Template, opts: Options) -> Prepared:
    """Load, validate, deduplicate, split and tokenize; reuse the cached result when nothing changed."""
    from .data import FileReport, expand, held_out_warning, overlap

    train_files = expand(train_spec)
    files = train_files + (expand(val_spec) if val_spec else [])
    digest, key = data_digest(files), None
    if opts.cache_dir:
        key = Path(opts.cache_dir) / fingerprint(files, digest, tokenizer, template, {
            **asdict(opts), "cache_dir": None, "val": bool(val_spec), "train_files": len(train_files)})
        hit = cache_load(key)
        if hit:
            train, val, meta = hit
            return Prepared(train, val, Stats(**meta["train_stats"]),
                            Stats(**meta["val_stats"]) if meta["val_stats"] else None, meta["report"], True, digest)
    reports: List[FileReport] = []
    train_records, val_records, dup = load_and_split(train_spec, val_spec, opts, reports)
    for r in reports[:len(train_files)]:
        r.warnings += filter(None, [held_out_warning(r.path)])
    leaks = overlap(train_records, val_records)
    report = {"files": [asdict(r) for r in reports],
              "duplicates": asdict(dup) if dup else None,
              "leaks": [r.where for r in leaks[:MAX_LISTED]], "leak_count": len(leaks),
              "warnings": [w for r in reports for w in r.warnings]}
    if not val_spec and opts.val_fraction > 0 and opts.split_by == "source":
        records = train_records + val_records
        if unsourced := sum(not r.source for r in records):
            which = ("no record has a source" if unsourced == len(records) else
                     f"{unsourced} of {len(records)} records have no source")
            report["warnings"].append(f"data.split_by=source: {which}; each such record is a group of its own, as "
                                      "with data.split_by=record")
    if leaks:
        report["warnings"].append(f"{len(leaks)} validation question(s) also appear in the training data "
                                  f"(e.g. {leaks[0].where}): the validation loss will be optimistic")
    system = opts.system_prompt if opts.system_prompt is not None else template.system
    for warning in (own_system_prompts(train_records + val_records, system),
                    special_token_text(train_records + val_records, tokenizer),
                    prompt_joins_answer(tokenizer, template, system),
                    unsourced_prompts(train_records + val_records, template)):
        report["warnings"] += [warning] if warning else []
    train, train_stats = tokenize(train_records, tokenizer, template, opts.max_length, opts.overlong,
                                  opts.system_prompt, opts.train_replies)
    val = val_stats = None
    if val_records:
        val, val_stats = tokenize(val_records, tokenizer, template, opts.max_length, opts.overlong,
                                  opts.system_prompt, opts.train_replies)
    for st in (train_stats, val_stats):
        if st and st.question_too_long:
            report["warnings"].append(
                f"{st.question_too_long} record(s) dropped: the prompt alone (system prompt, question and "
                f"template) fills data.max_length={opts.max_length} tokens, leaving no room for the answer "
                f"({'; '.join(st.question_too_long_at)}). Raise data.max_length or shorten them.")
    if train_stats.truncated >= TRUNCATED_WARN * train_stats.rows:
        report["warnings"].append(truncation_warning(train_stats, opts.max_length))
    if key is not None:
        cache_save(key, train, val, {"train_stats": asdict(train_stats),
                                     "val_stats": asdict(val_stats) if val_stats else None, "report": report})
    return Prepared(train, val, train_stats, val_stats, report, digest=digest)


# ---- the prepared-data cache --------------------------------------------------------------------------------

def data_digest(files: Sequence[Path]) -> str:
    """SHA-256 of the data files' contents, in order (a save_to_disk folder: its files', by name)."""
    h = hashlib.sha256()
    for f in files:
        for part in sorted(p for p in Path(f).rglob("*") if p.is_file()) if Path(f).is_dir() else [f]:
            h.update(str(part.relative_to(f)).encode() if part != f else b"")
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(files: Sequence[Path], digest: str, tokenizer, template: Template, options: dict) -> str:
    """Changes whenever anything that shapes the rows changes: file names and contents (digest: data_digest),
    tokenizer, template, options, our code."""
    h = hashlib.sha256(__version__.encode())
    for module in ("data.py", "templates.py", "prepare.py"):  # our own code that shapes the rows, as it is now
        h.update((Path(__file__).parent / module).read_bytes())
    h.update("\0".join(map(str, files)).encode() + digest.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
             else repr(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([asdict(template), options], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


CACHE_KEEP = 32  # prepared data sets kept in the cache: the most recently used


def cache_load(path: Path):
    """(train, validation, meta) of a cache entry, marked as used now; None when absent or gone while being read
    (another run pruned it)."""
    from datasets import load_from_disk

    try:
        meta = json.loads((path / "meta.json").read_text())
        train = load_from_disk(str(path / "train"))
        val = load_from_disk(str(path / "validation")) if (path / "validation").exists() else None
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):  # (a read-only cache is still read)
        os.utime(path / "meta.json")
    return train, val, meta


def cache_prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used entries, and the temporary folders of runs killed a day ago."""
    import shutil
    import time

    def used(p: Path) -> float:
        with contextlib.suppress(OSError):
            return (p / "meta.json").stat().st_mtime if ".tmp-" not in p.name else p.stat().st_mtime
        return 0.0

    folders = [p for p in root.iterdir() if p.is_dir()]
    entries = sorted((p for p in folders if ".tmp-" not in p.name), key=used, reverse=True)
    stale = [p for p in folders if ".tmp-" in p.name and used(p) < time.time() - 86400]
    for p in entries[keep:] + stale:
        shutil.rmtree(p, ignore_errors=True)


def cache_save(path: Path, train, val, meta: dict) -> None:
    """Written to a temporary folder and renamed into place, so a cache entry is whole or absent."""
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        train.save_to_disk(str(tmp / "train"))
        if val is not None:
            val.save_to_disk(str(tmp / "validation"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, path)
        cache_prune(path.parent, CACHE_KEEP)
    except OSError:
        pass  # another process wrote it first, or the disk is read-only: the cache is only an optimization
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
