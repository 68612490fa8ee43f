"""Prompt templates: how one {question, answer, source} record becomes chat messages.

A template is a user-message format string, an optional system prompt and an optional Jinja chat template
that replaces the tokenizer's own (for base models that have none). The chat template that trained the
adapter is saved with its tokenizer, so inference renders prompts exactly as training did.

Built in: `chat` (the tokenizer's template), `chat_with_source` (the source goes into the prompt) and
`plain` (the original design's "System: / User: / Assistant:" text). More come from YAML files
(see conf/templates/): a list of {name, description, user, system, chat_template}.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import yaml

from .errors import UserError

FIELDS = ("question", "answer", "source")

# The original design's text format, as a chat template so that training and inference share it.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ 'System: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)  # the prompt ends at the colon: the space is the answer's, as its first token (' The') holds it


@dataclass(frozen=True)
class Template:
    name: str
    user: str = "{question}"  # str.format over question and source
    system: Optional[str] = None  # None: no system message (the chat template's own default applies)
    chat_template: Optional[str] = None  # None: the tokenizer's own
    description: str = ""

    def messages(self, record: dict, system_prompt: Optional[str] = None, history: Sequence[dict] = ()) -> List[dict]:
        """The prompt messages (system?, the earlier turns of a conversation, user) for one record; every user turn in
        this template's format, so that a conversation's first reply trains on the prompt that chat sends first."""
        system = system_prompt if system_prompt is not None else self.system
        values = {k: record.get(k) or "" for k in FIELDS}

        def user(question: str) -> dict:
            return {"role": "user", "content": self.user.format(**{**values, "question": question})}

        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [user(m["content"]) if m["role"] == "user" else m for m in history] + [user(values["question"])]

    def apply_to(self, tokenizer) -> None:
        """Install this template's chat template on the tokenizer (saved with it later)."""
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"Template '{self.name}' uses the tokenizer's chat template, but this tokenizer has none "
                "(a base model?). Use data.template=plain, or a template with its own chat_template.")


NO_SYSTEM = ("This model's chat template takes no system message (Gemma 2's, say): train without one, data.system_prompt="
             "null and a template with no 'system' (records' own system turns cannot train with it), or put the "
             "instructions in the user field of a template of your own (conf/templates/: user: \"Answer briefly.\\n\\n"
             "{question}\").")


@contextlib.contextmanager
def refusals(what: str, messages: Sequence[dict], no_system: str = NO_SYSTEM):
    """A chat template's own refusal of `messages` (Jinja's raise_exception) as one paragraph naming `what` was
    rendered; where the messages hold a system message, with `no_system`, the way out."""
    from jinja2.exceptions import TemplateError

    try:
        yield
    except TemplateError as e:
        way_out = f" {no_system}" if any(m["role"] == "system" for m in messages) else ""
        raise UserError(f"The chat template refused {what}: {e}.{way_out}") from None


BUILTIN: Dict[str, Template] = {
    t.name: t
    for t in (
        Template("chat", description="The tokenizer's own chat template; the question as the user message"),
        Template("chat_with_source", user="Source: {source}\n\n{question}",
                 description="Like chat, with the record's source named in the prompt"),
        Template("plain", system="You are a helpful assistant.", chat_template=PLAIN_CHAT_TEMPLATE,
                 description="The original 'System:/User:/Assistant:' text, for base models"),
    )
}


def _yaml_files(paths: Iterable[str]) -> List[Path]:
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"Template file {p} (data.template_files) does not exist.")
    return files


def load_yaml_templates(path: Path) -> List[Template]:
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"Template file {path} is not valid YAML: {e}") from None
    items = items if isinstance(items, list) else [items]
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise UserError(f"Template file {path}, entry {i}: needs a mapping with a 'name' string.")
        unknown = set(item) - {"name", "description", "user", "system", "chat_template"}
        if unknown:
            raise UserError(f"Template file {path}, entry {i} ('{item['name']}'): unknown field(s) "
                            f"{sorted(unknown)}; allowed: name, description, user, system, chat_template.")
        chat = item.get("chat_template")
        if chat and chat.strip().endswith(".jinja"):
            chat = (path.parent / chat.strip()).read_text(encoding="utf-8")
        user = item.get("user", "{question}")
        try:
            user.format(question="", source="")
        except (KeyError, IndexError, ValueError) as e:
            leak = (" ({answer} would put the answer in the prompt that trains the model to give it; at inference "
                    "there is none)" if e.args == ("answer",) else f" ({e!r})")
            raise UserError(f"Template file {path}, entry {i} ('{item['name']}'): field 'user' may only use "
                            f"{{question}} and {{source}}{leak}.") from None
        if "{question}" not in user:
            raise UserError(f"Template file {path}, entry {i} ('{item['name']}'): field 'user' has no {{question}}, so "
                            "every prompt would be the same; write where the question goes (user: \"Answer briefly."
                            "\\n\\n{question}\").")
        out.append(Template(item["name"], user=user, system=item.get("system"), chat_template=chat,
                            description=item.get("description", "")))
    return out


def registry(template_files: Iterable[str] = ()) -> Dict[str, Template]:
    reg = dict(BUILTIN)
    for f in _yaml_files(template_files):
        for t in load_yaml_templates(f):
            reg[t.name] = t
    return reg


def get(name: str, template_files: Iterable[str] = ()) -> Template:
    reg = registry(template_files)
    if name not in reg:
        known = ", ".join(f"{n} ({t.description})" if t.description else n for n, t in reg.items())
        raise UserError(f"Unknown template '{name}' (data.template). Known templates: {known}.")
    return reg[name]
