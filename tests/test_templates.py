import pytest

from sft_recipes import templates
from sft_recipes.errors import UserError

RECORD = {"question": "What is a p-value?", "answer": "A probability.", "source": "Ch. 5, §5.3"}


def test_builtins_and_unknown_name_lists_known():
    assert {"chat", "chat_with_source", "plain"} <= set(templates.registry())
    with pytest.raises(UserError) as e:
        templates.get("chatt")
    assert "Unknown template 'chatt'" in str(e.value)
    for name in ("chat", "chat_with_source", "plain"):
        assert name in str(e.value)


def test_messages_with_source_and_system_prompt():
    t = templates.get("chat_with_source")
    assert t.messages(RECORD) == [{"role": "user", "content": "Source: Ch. 5, §5.3\n\nWhat is a p-value?"}]
    msgs = templates.get("chat").messages(RECORD, system_prompt="Be brief.")
    assert msgs[0] == {"role": "system", "content": "Be brief."}


def test_plain_template_renders_original_format(embedded_dir):
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)  # a fresh copy: apply_to changes the tokenizer
    t = templates.get("plain")
    t.apply_to(tok)
    prompt = tok.apply_chat_template(t.messages(RECORD), tokenize=False, add_generation_prompt=True)
    assert prompt == "System: You are a helpful assistant.\nUser: What is a p-value?\nAssistant:"  # (space: answer's)
    full = tok.apply_chat_template(t.messages(RECORD) + [{"role": "assistant", "content": "A probability."}],
                                   tokenize=False)
    assert full.startswith(prompt) and full.endswith("A probability." + tok.eos_token + "\n")


def test_yaml_templates_are_added_without_code(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "- name: terse\n  description: short answers\n  system: Answer in one line.\n  user: 'Q: {question}'\n")
    t = templates.get("terse", [str(tmp_path)])
    assert t.messages(RECORD) == [{"role": "system", "content": "Answer in one line."},
                                  {"role": "user", "content": "Q: What is a p-value?"}]
    # the shipped example in conf/templates is found through the default data.template_files
    assert "tutor" in templates.registry(["conf/templates"])


def test_yaml_template_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: x\n  usr: '{question}'\n")
    with pytest.raises(UserError, match=r"bad.yaml, entry 1 \('x'\): unknown field\(s\) \['usr'\]"):
        templates.get("x", [str(bad)])
    bad.write_text("- name: y\n  user: '{questionn}'\n")
    with pytest.raises(UserError, match="field 'user' may only use"):
        templates.get("y", [str(bad)])
    bad.write_text("- name: z\n  user: 'Q: {question}\\nA: {answer}'\n")  # the answer would be in its own prompt
    with pytest.raises(UserError, match=r"field 'user' may only use \{question\} and \{source\} \(\{answer\} would put "
                                        r"the answer in the prompt that trains the model to give it"):
        templates.get("z", [str(bad)])
    bad.write_text("- name: w\n  user: 'Answer briefly.'\n")  # every prompt the same, the question left out
    with pytest.raises(UserError, match=r"field 'user' has no \{question\}, so every prompt would be the same"):
        templates.get("w", [str(bad)])


NO_SYSTEM_TEMPLATE = (  # as Gemma 2's: no system role
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + "
    "m['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
    "{% endif %}")


def test_a_chat_template_that_refuses_a_system_message_says_how_to_train(embedded_dir, tmp_path):
    """A chat template's own refusal (Gemma 2's takes no system message) is one paragraph naming what it refused, the
    run's system prompt or a record's own, and the way out; without a system message the same template trains."""
    from sft_recipes import prepare
    from sft_recipes.data import Record
    from sft_recipes.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    t = templates.Template("gemma", chat_template=NO_SYSTEM_TEMPLATE)
    t.apply_to(tok)
    plain = Record("What is a p-value?", "A probability.", where="qa.jsonl, line 1")
    own = Record("What is a mean?", "An average.", where="qa.jsonl, line 2", system="Be nice.")
    with pytest.raises(UserError, match=r"^The chat template refused the prompt of data.template=gemma with the system "
                                        r"prompt 'Be brief.': System role not supported. .*data.system_prompt=null"):
        prepare.tokenize([plain], tok, t, 512, system_prompt="Be brief.")
    (tmp_path / "qa.json").write_text('[{"question": "What is a p-value?", "answer": "A probability."}]')
    with pytest.raises(UserError, match=r"^The chat template refused the prompt of data.template=gemma with the system "
                                        r"prompt 'Be brief.'"):  # (the whole preparation: its warnings' checks too)
        prepare.prepare(str(tmp_path / "qa.json"), None, tok, t,
                        prepare.Options(max_length=512, system_prompt="Be brief."))
    with pytest.raises(UserError, match=r"^The chat template refused the messages of qa.jsonl, line 2: System role "
                                        r"not supported. .*user: \"Answer briefly.\\n\\n\{question\}\""):
        prepare.tokenize([plain, own], tok, t, 512)
    dataset, stats = prepare.tokenize([plain], tok, t, 512)
    assert stats.kept == 1 and tok.decode(dataset[0]["input_ids"]).startswith("<start_of_turn>user\nWhat is a p-value?")
