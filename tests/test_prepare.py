"""Formats, deduplication, leak-free splits, the fast tokenization path and the prepared-data cache."""
import copy
import json
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QWEN3_LIKE, ROOT, TRAIN, VAL
from sft_recipes import data, prepare, report, templates
from sft_recipes.errors import UserError


def rec(q, a, s=""):
    return {"question": q, "answer": a, "source": s}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["question", "answer", "source", "x", "messages", "role", "content", "data", "prompt",
                         "completion", "weight"])
        | st.text(max_size=5), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, suffix=st.sampled_from([".json", ".jsonl", ".csv", ".tsv"]), raw=st.binary(max_size=40),
       table=st.text(alphabet='questionasw,;|"\t\r\n \x00', max_size=60))
def test_random_input_never_crashes_with_anything_but_our_error(tmp_path, value, suffix, raw, table):
    for content in (json.dumps(value).encode(), raw, table.encode()):
        path = tmp_path / f"f{suffix}"
        path.write_bytes(content)
        try:
            records = data.load_records(path)
        except UserError as e:
            assert str(path) in str(e)
        else:
            assert records and all(r.question.strip() and r.answer.strip() for r in records)


def test_folder_glob_list_csv_tsv_and_parquet_with_column_mapping(tmp_path):
    import pandas as pd

    (tmp_path / "a.json").write_text(json.dumps([rec("Q1?", "A1.")]))
    (tmp_path / "b.jsonl").write_text(json.dumps(rec("Q2?", "A2.")) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(data.load_many(str(tmp_path))) == 2
    assert len(data.load_many(str(tmp_path / "*.json*"))) == 2
    assert len(data.load_many([str(tmp_path / "a.json"), str(TRAIN)])) == 113
    other = tmp_path / "other"
    other.mkdir()
    pd.DataFrame({"prompt": ["Q3?", "Q4?"], "response": ["A3.", "A4."], "ref": ["S3", "S4"]}).to_csv(
        other / "c.csv", index=False)
    pd.DataFrame({"prompt": ["Q5?"], "response": ["A5."], "ref": ["S5"]}).to_parquet(other / "d.parquet")
    (other / "e.tsv").write_text("prompt\tresponse\tref\nQ6, with a comma?\tA6.\tS6\n")  # a spreadsheet's export
    records = data.load_many(str(other), {"question": "prompt", "answer": "response", "source": "ref"})
    assert [r.as_dict() for r in records] == [rec("Q3?", "A3.", "S3"), rec("Q4?", "A4.", "S4"), rec("Q5?", "A5.", "S5"),
                                              rec("Q6, with a comma?", "A6.", "S6")]
    with pytest.raises(UserError, match="No data files match"):
        data.load_many(str(tmp_path / "*.xml"))


def test_datasets_save_to_disk_folders(tmp_path, tokenizer):
    """A Dataset saved with `datasets`' save_to_disk is read as one table (not its JSON metadata files); a
    DatasetDict's folder is refused with the splits' folders to name; the prepared-data cache sees an edit."""
    import datasets

    records = json.loads(TRAIN.read_text())
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:80]),
                          "test": datasets.Dataset.from_list(records[80:])}).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(UserError) as e:
        data.load_many(str(tmp_path / "qa"))
    assert str(e.value) == (f"{tmp_path / 'qa'} holds a DatasetDict (datasets' save_to_disk) with the split(s) train, "
                            f"test: name a split's folder, data.train_path={tmp_path / 'qa' / 'train'} "
                            f"data.val_path={tmp_path / 'qa' / 'test'}.")
    train = data.load_many(str(tmp_path / "qa" / "train"))
    assert [r.as_dict() for r in train] == [{"source": "", **r} for r in records[:80]]
    assert train[3].where == f"{tmp_path / 'qa' / 'train'}, row 4"
    opts = prepare.Options(max_length=512, cache_dir=str(tmp_path / "cache"))
    split = lambda name: str(tmp_path / "qa" / name)  # noqa: E731
    first = prepare.prepare(split("train"), split("test"), tokenizer, templates.get("chat"), opts)
    assert (len(first.train), len(first.val)) == (80, 32)
    assert prepare.prepare(split("train"), split("test"), tokenizer, templates.get("chat"), opts).from_cache
    datasets.Dataset.from_list(records[:79]).save_to_disk(str(tmp_path / "qa" / "train"))  # one record less
    again = prepare.prepare(split("train"), split("test"), tokenizer, templates.get("chat"), opts)
    assert not again.from_cache and len(again.train) == 79 and again.digest != first.digest
    datasets.Dataset.from_list([rec("Q?", "A.")] + [{"question": "Q2?", "answer": None, "source": "s"}]).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"1 invalid record\(s\) in .*bad: row 2: field 'answer' is empty"):
        data.load_many(str(tmp_path / "bad"))


def test_chat_transcripts_train_with_their_own_system_message(tmp_path, tokenizer):
    """A chat transcript's system message is its record's system prompt in training (records without one take the
    run's); where it is not the run's, a warning names it, and data.system_prompt that makes it the run's."""
    def turns(system, question):
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                             {"role": "assistant", "content": "A."}]}

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([*(json.dumps(turns("Be brief.", f"Q{i}?")) for i in range(3)),
                               json.dumps({"question": "Q3?", "answer": "A."})]))
    out = prepare.prepare(str(path), None, tokenizer, templates.get("chat"), prepare.Options(max_length=128))
    assert (f"3 record(s) hold a system message other than the run's system prompt (unset: the template's default): 1 "
            f"different, the first 'Be brief.' ({path}, line 1). Each trains with its own; chat and the model card use "
            "the run's; 'data.system_prompt=\"Be brief.\"' makes it the run's") in out.report["warnings"]
    shown = [prepare.show_example(row, tokenizer) for row in out.train]
    assert [s.startswith("<|im_start|>system\nBe brief.<|im_end|>") for s in shown] == [True, True, True, False]
    assert "You are a helpful AI assistant named SmolLM" in shown[3]  # (the template's default, the run's)
    same = prepare.prepare(str(path), None, tokenizer, templates.get("chat"),
                           prepare.Options(max_length=128, system_prompt="Be brief."))
    assert same.train["input_ids"][:3] == out.train["input_ids"][:3] and not same.report["warnings"]
    assert prepare.show_example(same.train[3], tokenizer).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    path.write_text(json.dumps(turns("Be brief.", "Q?")) + "\n" + json.dumps(turns("Be long.", "Q2?")))
    mixed = prepare.prepare(str(path), None, tokenizer, templates.get("chat"),
                            prepare.Options(max_length=128, system_prompt="Be brief."))
    assert mixed.report["warnings"][0] == (  # (no data.system_prompt to name: the records hold two)
        "1 record(s) hold a system message other than the run's system prompt, 'Be brief.': 1 different, the first "
        f"'Be long.' ({path}, line 2). Each trains with its own; chat and the model card use the run's")
    assert "Be long." in prepare.show_example(mixed.train[1], tokenizer)


def test_a_conversation_trains_every_reply_and_no_user_turn(tmp_path, tokenizer):
    """A conversation of several exchanges is one row, rendered whole as chat renders it: the loss falls on each
    reply and the end-of-turn token that closes it, never on a user turn; each reply's prompt is the conversation
    before it as chat would send it. A row cut at data.max_length keeps the replies before the cut."""
    import itertools

    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    conv = [turn("user", "What is a mean?"), turn("assistant", "The average."), turn("user", "And a median?"),
            turn("assistant", "The middle value.")]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (conv, conv[2:])))
    tmpl, opts = templates.get("chat"), prepare.Options(max_length=512)

    def spans(row):
        groups = itertools.groupby(zip(row["input_ids"], row["labels"]), key=lambda p: p[1] != -100)
        return [tokenizer.decode([t for t, label in g]) for trained, g in groups if trained]

    out = prepare.prepare(str(path), None, tokenizer, tmpl, opts)
    row = out.train[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(conv, tokenize=False).rstrip("\n")
    assert spans(row) == ["The average.<|im_end|>", "The middle value.<|im_end|>"]
    assert all(label in (-100, t) for t, label in zip(row["input_ids"], row["labels"]))
    labels = row["labels"]
    start = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100][1]  # the second reply's
    prompt = tokenizer(tokenizer.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:start] == prompt  # the second reply's prompt: the conversation before it, as chat sends it
    assert spans(out.train[1]) == ["The middle value.<|im_end|>"]  # the same last exchange alone is another record
    assert out.train_stats.trained_tokens == sum(label != -100 for r in out.train for label in r["labels"])
    cut = prepare.prepare(str(path), None, tokenizer, tmpl, prepare.Options(max_length=start - 3, cache_dir=None))
    assert spans(cut.train[0]) == ["The average.<|im_end|>"] and cut.train_stats.truncated == 1
    assert len(cut.train[0]["input_ids"]) == start - 3
    weights = [{**conv[1], "weight": 0}, {**conv[3], "weight": 0}]  # OpenAI's "weight": 0, the first or the last reply
    path.write_text("\n".join(json.dumps({"messages": m}) for m in ([conv[0], weights[0], *conv[2:]],
                                                                    [*conv[:3], weights[1]])))
    first_off, last_off = prepare.prepare(str(path), None, tokenizer, tmpl,
                                          prepare.Options(max_length=512, dedup=False)).train  # (the same texts)
    assert spans(first_off) == ["The middle value.<|im_end|>"] and spans(last_off) == ["The average.<|im_end|>"]
    assert first_off["input_ids"] == row["input_ids"] == last_off["input_ids"]  # the same tokens, fewer trained
    path.write_text(json.dumps({"messages": conv, "source": "Ch. 1"}))  # a template that writes the question its way:
    sourced = templates.get("chat_with_source")
    row = prepare.prepare(str(path), None, tokenizer, sourced, opts).train[0]
    first = tokenizer.apply_chat_template(sourced.messages({"question": "What is a mean?", "source": "Ch. 1"}),
                                          tokenize=False, add_generation_prompt=True)
    trained_from = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tokenizer.decode(row["input_ids"][:trained_from]) == first  # the first reply's prompt is chat's first one,
    assert tokenizer.decode(row["input_ids"]).count("Source: Ch. 1\n\n") == 2  # as every user turn is in that format


def test_a_template_that_rewrites_earlier_replies_is_refused(tmp_path, embedded_dir):
    """A chat template that renders the conversation's earlier replies otherwise once it goes on (as templates that
    drop earlier reasoning do) would train prompts that chat never sends: named, not trained. With
    data.train_replies=each every reply trains in a row of its own, after the conversation before it as the template
    renders it for chat; with data.train_replies=last only the last reply trains."""
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    tmpl = templates.Template("last_reply_only", chat_template=(
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ':\\n' + m['content'] + "
        "eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"))
    tmpl.apply_to(tok)
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [turn("user", "a?"), turn("assistant", "b."), turn("user", "c?"),
                                             turn("assistant", "d.")]}))
    with pytest.raises(UserError, match=f"Template 'last_reply_only' renders the prompt of {path}, line 1 differently "
                                        r"alone than inside the conversation.*\(data.train_replies=each trains "
                                        r"every reply in a row of its own"):
        prepare.prepare(str(path), None, tok, tmpl, prepare.Options(max_length=128))
    each = prepare.prepare(str(path), None, tok, tmpl, prepare.Options(max_length=128, train_replies="each"))
    assert (each.train_stats.records, each.train_stats.rows, each.train_stats.conversations) == (1, 2, 1)
    for row, (prompt, reply) in zip(each.train, [("user:\na?<|im_end|>\nassistant:\n", "b.<|im_end|>"),
                                                 ("user:\na?<|im_end|>\nuser:\nc?<|im_end|>\nassistant:\n",
                                                  "d.<|im_end|>")]):
        trained_from = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert tok.decode(row["input_ids"][:trained_from]) == prompt  # each reply's prompt, as chat sends it
        assert tok.decode(row["input_ids"][trained_from:]) == reply
        assert all(label != -100 for label in row["labels"][trained_from:])
    row = prepare.prepare(str(path), None, tok, tmpl, prepare.Options(max_length=128, train_replies="last")).train[0]
    trained_from = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tok.decode(row["input_ids"][:trained_from]) == "user:\na?<|im_end|>\nuser:\nc?<|im_end|>\nassistant:\n"
    assert tok.decode(row["input_ids"][trained_from:]) == "d.<|im_end|>"  # the last reply's prompt, as chat sends it

    tok.chat_template = QWEN3_LIKE  # a reasoning block before the last reply alone: the message says so
    chat = templates.get("chat")
    with pytest.raises(UserError, match=r"conversation \(it writes a reasoning block, </think>, before the last reply "
                                        r"alone, as Qwen3's does, and none before the earlier ones\)"):
        prepare.prepare(str(path), None, tok, chat, prepare.Options(max_length=128))
    rows = prepare.prepare(str(path), None, tok, chat, prepare.Options(max_length=128, train_replies="each")).train
    assert [tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]) for row in rows] \
        == ["<think>\n\n</think>\n\nb.<|im_end|>", "<think>\n\n</think>\n\nd.<|im_end|>"]  # each as chat has it
    row = prepare.prepare(str(path), None, tok, chat, prepare.Options(max_length=128, train_replies="last")).train[0]
    trained_from = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tok.decode(row["input_ids"][trained_from:]) == "<think>\n\n</think>\n\nd.<|im_end|>"


def test_a_generation_prompt_that_the_reply_does_not_follow_is_named(tokenizer):
    """DeepSeek-R1's distills: the generation prompt opens a reasoning block that the rendered reply leaves out, so
    no answer could train after the prompt that chat sends. The run stops, naming both texts where they part."""
    tok = copy.deepcopy(tokenizer)
    tmpl = templates.Template("r1_like", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
        "{% else %}{{ '<|Assistant|>' + m['content'].split('</think>')[-1] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"))
    tmpl.apply_to(tok)
    with pytest.raises(UserError, match=re.escape(
            f"Template 'r1_like' renders the prompt of {TRAIN}, record 1 differently alone than inside the "
            "conversation: alone it reads 'sample?<|Assistant|><think>\\n' where the conversation reads "
            "'sample?<|Assistant|>A population is the ', so training would not match inference; fix its chat_template.")):
        prepare.prepare(str(TRAIN), None, tok, tmpl, prepare.Options(max_length=512))


def test_train_replies_last_or_each(tmp_path, tokenizer):
    """data.train_replies=last: the earlier replies of a conversation are context, as the user turns are; a record
    without earlier turns trains as before, and one whose last reply has the weight 0 is refused by name.
    data.train_replies=each: every reply trains, each in a row that ends with it (a reply with the weight 0 makes
    none), the same tokens trained as with all."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    conv = [turn("user", "What is a mean?"), turn("assistant", "The average."), turn("user", "And a median?"),
            turn("assistant", "The middle value.")]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ({"messages": conv}, {"question": "Q?", "answer": "A."})))
    tmpl = templates.get("chat")
    every, last = (prepare.prepare(str(path), None, tokenizer, tmpl, prepare.Options(max_length=512, train_replies=t))
                   for t in ("all", "last"))
    assert every.train["input_ids"] == last.train["input_ids"]  # the same tokens, fewer trained
    (row, plain), (every_row, every_plain) = last.train, every.train
    assert plain["labels"] == every_plain["labels"]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "The middle value.<|im_end|>"
    assert row["labels"][-len(trained):] == every_row["labels"][-len(trained):]
    earlier = tokenizer("The average.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert last.train_stats.trained_tokens == every.train_stats.trained_tokens - len(earlier)
    # data.train_replies=each: the same replies trained, each in a row of its own ending with it
    each = prepare.prepare(str(path), None, tokenizer, tmpl, prepare.Options(max_length=512, train_replies="each"))
    assert each.train_stats.trained_tokens == every.train_stats.trained_tokens
    first_row = each.train[0]  # the conversation up to its first reply: where the whole one begins
    assert every_row["input_ids"][:len(first_row["input_ids"])] == first_row["input_ids"]
    assert tokenizer.decode([t for t, label in zip(first_row["input_ids"], first_row["labels"]) if label != -100]) \
        == "The average.<|im_end|>"
    assert each.train[1] == row and each.train[2] == plain  # the last reply's row is train_replies=last's
    assert report.data_summary("Training data", each.train_stats).startswith(
        "Training data: 2 records (3 rows, one per reply), kept 3; ")
    assert "1 conversation(s) of several exchanges, every reply trained, each in a row of its own after the " \
        "conversation before it (data.train_replies=each)" in report.data_summary("Training data", each.train_stats)
    path.write_text(json.dumps({"messages": [*conv[:3], {**conv[3], "weight": 0}]}))
    with pytest.raises(UserError, match=f"{path}, line 1: its last reply has the weight 0, and with "
                                        "data.train_replies=last no other reply trains"):
        prepare.prepare(str(path), None, tokenizer, tmpl, prepare.Options(max_length=512, train_replies="last"))
    each = prepare.prepare(str(path), None, tokenizer, tmpl, prepare.Options(max_length=512, train_replies="each"))
    assert list(each.train) == [first_row]  # (a reply with the weight 0 makes no row)


def test_all_files_are_checked_before_failing(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "Q"}]))
    (tmp_path / "b.json").write_text("[oops")
    with pytest.raises(UserError) as e:
        data.load_many(str(tmp_path))
    assert "a.json: record 1: field 'answer' is missing" in str(e.value) and "b.json: not valid JSON" in str(e.value)


def test_dedup_exact_normalized_and_conflicting():
    records = [data.Record(**r) for r in (
        rec("What is a mean?", "The average."), rec("What is a mean?", "The average."),       # exact
        rec("what is a MEAN", "the  average"), rec("What is a mean?", "The arithmetic average."),  # normalized; conflict
        rec("What is a mode?", "The most common value."))]
    kept, rep = data.dedup(records)
    assert (rep.exact, rep.normalized, rep.conflicting, len(kept)) == (1, 1, 1, 3)
    assert kept[0].answer == "The average."


def test_split_by_source_keeps_sources_whole_and_leaks_are_found():
    records = data.load_records(TRAIN)
    train, val = data.split(records, 0.2, seed=3, by="source")
    assert not {r.source for r in train} & {r.source for r in val}
    assert 0.15 * len(records) <= len(val) <= 0.35 * len(records)
    assert data.split(records, 0.2, seed=3, by="source")[1] == val
    copy = data.Record("WHAT is a p-value", "x", "", "val.json, record 1")
    assert data.overlap(records, [copy, data.Record("Brand new?", "y")]) == [copy]


def test_split_by_source_says_when_records_have_no_source(tmp_path, tokenizer):
    import json

    records = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}.", **({"source": "ch1"} if i < 3 else {})}
               for i in range(12)]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    warnings = lambda: prepare.prepare(str(tmp_path / "qa.json"), None, tokenizer, templates.get("chat"),  # noqa: E731
                                       prepare.Options(max_length=128, val_fraction=0.25, split_by="source")
                                       ).report["warnings"]
    assert ("data.split_by=source: 9 of 12 records have no source; each such record is a group of its own, as with "
            "data.split_by=record") in warnings()
    (tmp_path / "qa.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "source"} for r in records]))
    assert any(w.startswith("data.split_by=source: no record has a source;") for w in warnings())


def test_a_template_that_names_the_source_says_when_records_have_none():
    records = [data.Record("What is a mean?", "The average.", "Ch. 1"), data.Record("What is a mode?", "The most common.")]
    assert prepare.unsourced_prompts(records, templates.get("chat")) is None  # (no {source} in its prompt)
    assert prepare.unsourced_prompts(records[:1], templates.get("chat_with_source")) is None
    assert prepare.unsourced_prompts(records, templates.get("chat_with_source")) == (
        "data.template=chat_with_source names the source in each prompt, but 1 of 2 records have none: their prompts "
        "name an empty source. Give them a source field (data.columns.source=NAME for another name), or use a template "
        "without {source} (data.template=chat).")


@pytest.mark.parametrize("template", ["chat", "chat_with_source", "tutor"])
def test_fast_path_equals_the_reference_token_for_token(tokenizer, template):
    records = data.load_records(TRAIN) + [data.Record(q, a, s, f"extra {i}") for i, (q, a, s) in enumerate([
        ("  leading spaces?", "\n\nanswer after blank lines", "x"), ("tab\tand trailing ", "ünïcödé — ∑ 42 ", ""),
        ("What?\n", " 3.5", "Ch. 1")])]
    tmpl = templates.get(template, [str(ROOT / "conf" / "templates")])
    r = prepare.Renderer(tokenizer, tmpl)
    assert r.pieces is not None
    (fast, fast_n), (reference, ref_n, gaps) = r.fast(records), r.reference(records)
    assert fast[:-3] == reference[:-3] and fast_n[:-3] == ref_n[:-3]  # all sample records, token for token
    assert fast[-3:] != reference[-3:]  # edge whitespace merges across pieces: why such records take the reference
    ids, n_prompt, gaps, used_fast = r(records)
    assert used_fast and ids == reference and n_prompt == ref_n and not any(gaps)


@pytest.mark.parametrize("template", ["chat", "chat_with_source", "plain", "tutor"])
def test_training_prompts_are_the_tokens_inference_sends(embedded_dir, template):
    """For each template, every record's prompt tokens in training are those of its prompt tokenized alone, as chat
    and generate send it, and every token of the answer trains: `plain` once ended its prompt in "Assistant: ",
    whose space the tokenizer joins to the answer's first word (' The'): that token was never trained."""
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)  # a fresh copy: apply_to changes the tokenizer
    tmpl = templates.get(template, [str(ROOT / "conf" / "templates")])
    tmpl.apply_to(tok)
    records = data.load_records(TRAIN)
    renderer = prepare.Renderer(tok, tmpl)
    ids, n_prompt, _, fast = renderer(records)
    assert fast and (ids, n_prompt) == renderer.reference(records)[:2]
    for r, row, n in zip(records, ids, n_prompt):
        prompt = tok.apply_chat_template(tmpl.messages(r.as_dict()), add_generation_prompt=True, tokenize=False)
        assert row[:n] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(row[n:]).strip() == r.answer + tok.eos_token
    assert prepare.prompt_joins_answer(tok, tmpl, tmpl.system) is None


def test_a_prompt_that_ends_inside_the_answers_first_token_is_warned_about(embedded_dir):
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    old = templates.Template("old_plain", system="Be brief.", chat_template=templates.PLAIN_CHAT_TEMPLATE.replace(
        "{{ 'Assistant:' }}", "{{ 'Assistant: ' }}"))
    old.apply_to(tok)
    assert prepare.prompt_joins_answer(tok, old, old.system) == (
        "data.template=old_plain: its prompt ends in '\\nAssistant: ', which the tokenizer joins to the answer's first "
        "word (' The' is one token): no answer's first token is trained, and at inference the prompt ends in a token "
        "that training never saw. Let the chat template's generation prompt end before that text, and put it at the "
        "start of the assistant's turn.")
    ds, _ = prepare.tokenize(data.load_records(TRAIN)[:1], tok, old, 512)
    assert prepare.show_example(ds[0], tok).endswith("Assistant: A>>> population is the entire group we want to "
                                                     "learn about; a sample is the subset of it that we actually "
                                                     "observe. We use statistics computed from the sample to estimate "
                                                     "parameters of the population.<|im_end|><<<")


def test_special_token_text_in_the_data_is_warned_about(tmp_path, tokenizer):
    """'<|im_end|>' typed inside an answer is read as the end-of-turn token, not as text: a warning names each place."""
    rows = [rec("What is a mean?", "The average. Thanks!<|im_end|>"), rec("How do I copy <filename> here?", "Use cp.")]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    prepared = prepare.prepare(str(path), None, tokenizer, templates.get("chat"), prepare.Options(max_length=512))
    assert (f"2 field(s) hold text that the tokenizer reads as one of its special tokens, not as text ({path}, record 1, "
            f"answer: '<|im_end|>'; {path}, record 2, question: '<filename>')") in " ".join(prepared.report["warnings"])
    assert tokenizer.eos_token_id in prepared.train[0]["input_ids"][:-1]  # (what the warning is about)
    clean = prepare.prepare(str(TRAIN), None, tokenizer, templates.get("chat"), prepare.Options(max_length=512))
    assert not [w for w in clean.report["warnings"] if "special tokens" in w]


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    tmpl = templates.get("chat")
    opts = prepare.Options(max_length=512, cache_dir=str(tmp_path / "cache"))
    first = prepare.prepare(str(TRAIN), str(VAL), tokenizer, tmpl, opts)
    second = prepare.prepare(str(TRAIN), str(VAL), tokenizer, tmpl, opts)
    assert not first.from_cache and second.from_cache
    assert second.train["input_ids"] == first.train["input_ids"] and second.val["labels"] == first.val["labels"]
    assert second.train_stats == first.train_stats and second.report == first.report
    opts.max_length = 64
    third = prepare.prepare(str(TRAIN), str(VAL), tokenizer, tmpl, opts)
    assert not third.from_cache and third.train_stats.truncated > 0
    # most answers cut: a warning with the lengths that keep them whole (none when few or none are cut)
    st = third.train_stats
    assert (f"{st.truncated} of 112 training answers ({100 * st.truncated / 112:.0f} %) are cut at data.max_length=64 "
            f"tokens" in " ".join(third.report["warnings"]))
    assert f"data.max_length={st.percentile(0.99)} keeps 99 % whole, {max(st.lengths)} all" in third.report["warnings"][-1]
    assert not [w for w in first.report["warnings"] if "are cut at" in w]
    data_file = tmp_path / "copy.json"
    data_file.write_text(TRAIN.read_text())
    prepare.prepare(str(data_file), str(VAL), tokenizer, tmpl, opts)
    data_file.write_text(json.dumps(json.loads(TRAIN.read_text())[:50]))
    assert not prepare.prepare(str(data_file), str(VAL), tokenizer, tmpl, opts).from_cache


def test_cache_keeps_the_most_recently_used(tmp_path, tokenizer, monkeypatch):
    """The cache holds prepare.CACHE_KEEP prepared sets: a new one removes the one used longest ago (a read marks
    an entry as used); a temporary folder that a killed run left a day ago goes too."""
    import os
    import time

    monkeypatch.setattr(prepare, "CACHE_KEEP", 2)
    cache = tmp_path / "cache"
    tmpl = templates.get("chat")
    prepared = lambda n: prepare.prepare(str(TRAIN), str(VAL), tokenizer, tmpl,  # noqa: E731
                                         prepare.Options(max_length=n, cache_dir=str(cache)))
    prepared(64)
    time.sleep(0.05)
    prepared(128)
    (left := cache / "0123.tmp-killed").mkdir()
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    time.sleep(0.05)
    assert prepared(64).from_cache  # now the most recently used
    time.sleep(0.05)
    prepared(256)  # a third: the 128 one goes, and the killed run's folder
    assert len(list(cache.iterdir())) == 2
    assert prepared(64).from_cache and prepared(256).from_cache and not prepared(128).from_cache


def test_prepare_reports_duplicates_and_leaks(tmp_path, tokenizer):
    rows = json.loads(TRAIN.read_text())
    val_rows = json.loads(VAL.read_text())
    (tmp_path / "train.json").write_text(json.dumps(rows + rows[:3] + [val_rows[0]]))
    out = prepare.prepare(str(tmp_path / "train.json"), str(VAL), tokenizer, templates.get("chat"),
                          prepare.Options(max_length=512))
    assert out.report["duplicates"]["exact"] == 3 and len(out.train) == len(rows) + 1
    assert out.report["leak_count"] == 1 and "also appear in the training data" in out.report["warnings"][0]


def test_a_question_that_fills_max_length_is_dropped_and_named(tmp_path, tokenizer):
    rows = json.loads(TRAIN.read_text())[:6]
    rows.insert(2, {"question": "Explain this table: " + "12.5 | " * 200, "answer": "It lists the cases."})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    opts = prepare.Options(max_length=256, cache_dir=str(tmp_path / "cache"))  # truncate: cuts answers only
    for _ in range(2):  # prepared, then from the cache: the same warning
        out = prepare.prepare(str(tmp_path / "train.json"), None, tokenizer, templates.get("chat"), opts)
        assert out.train_stats.dropped == out.train_stats.question_too_long == 1 and len(out.train) == 6
        assert re.search(rf"1 record\(s\) dropped: the prompt alone .* fills data.max_length=256 tokens, leaving no "
                         rf"room for the answer \({re.escape(str(tmp_path))}/train.json, record 3: \d+ prompt tokens\)",
                         out.report["warnings"][0])
    assert out.from_cache


def test_validate_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "sft_recipes.data", "validate", str(TRAIN), str(VAL)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "records" in ok.stdout and " 112 " in ok.stdout and " 20 " in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sft_recipes.data", "validate", str(ROOT / "tests" / "broken")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "INVALID" in bad.stdout and "Traceback" not in bad.stderr
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Summarize.", "input": "Text.", "output": "A."}) + "\n")
    unmapped = subprocess.run([sys.executable, "-m", "sft_recipes.data", "validate", str(alpaca)], capture_output=True,
                              text=True)  # the mapping it names is this command's own flags
    assert unmapped.returncode == 2 and unmapped.stdout.rstrip().endswith(
        "map them with --column question=instruction,input --column answer=output."), unmapped.stdout
    mapped = subprocess.run([sys.executable, "-m", "sft_recipes.data", "validate", str(alpaca), "--column",
                             "question=instruction,input", "--column", "answer=output"], capture_output=True, text=True)
    assert mapped.returncode == 0 and " ok " in mapped.stdout and "ignored" not in mapped.stdout, mapped.stdout
