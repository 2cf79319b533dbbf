"""Does the configured prompt_template fit the model's own chat format? Checked before training.

A chat model's tokenizer carries its chat format (its `chat_template`, and the special tokens that format is
written with). Training another family's format on it (the tutorial's InternLM config pointed at a Qwen
model, say) teaches the model markers it has never seen as units and writes that foreign format into the
merged model. The rule, in README's words:

* a tokenizer without a chat_template (a base model) never conflicts: the model learns the configured format;
* 'auto' is the tokenizer's own format;
* a named template **conflicts** when it writes markers (`<...>`- or `[...]`-shaped text such as `<eoa>`,
  `<|User|>`, `[INST]`) that the tokenizer neither holds as single tokens nor uses in its chat_template:
  training stops before anything is written, naming both formats and the fix (prompt_template = 'auto');
  prompt_template_check = False keeps the template on purpose;
* otherwise a two-turn conversation is rendered both ways and the text between the messages (role headers
  and end-of-turn markers, spaces aside) is compared, to say in the log whether the layouts agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.config.templates import TEMPLATES, Template, get_template
from tunelab.errors import ConfigError

# plain words that no template rewrites, so they can be found again in either rendering
_USER1, _ANSWER1, _USER2, _ANSWER2 = "Qzuserone", "Qzanswerone", "Qzusertwo", "Qzanswertwo"
# markers as chat formats write them: <eoa>, <|im_start|>, <<SYS>>, <start_of_turn>, [INST], [/INST], [gMASK]
_MARKER = re.compile(r"<+[^\s<>]+>+|\[/?[A-Za-z_]+\]")


@dataclass(frozen=True)
class TemplateFit:
    """The verdict on one (template, tokenizer) pair and the line that says it."""
    verdict: str   # 'base' (no chat_template), 'auto', 'match', 'differs', 'conflict'
    message: str


def _chat_template_text(tokenizer) -> str:
    own = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(own.values()) if isinstance(own, dict) else own  # a few tokenizers carry named templates


def _between_messages(text: str) -> tuple[str, str] | None:
    """(text between the first user message and its answer, text between that answer and the next user
    message), spaces removed; None when the rendering lost a message."""
    at = [text.find(w) for w in (_USER1, _ANSWER1, _USER2)]
    if min(at) < 0 or not at[0] < at[1] < at[2]:
        return None
    squeeze = lambda s: re.sub(r"\s+", "", s)  # noqa: E731 - '[/INST] A' and '[/INST]A' are one layout
    return (squeeze(text[at[0] + len(_USER1):at[1]]), squeeze(text[at[1] + len(_ANSWER1):at[2]]))


def _tokenizer_rendering(tokenizer) -> str | None:
    msgs = [{"role": "user", "content": _USER1}, {"role": "assistant", "content": _ANSWER1},
            {"role": "user", "content": _USER2}, {"role": "assistant", "content": _ANSWER2}]
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain dialogue leaves the markers to decide
        return None


def _template_rendering(tokenizer, template: Template) -> str:
    return PromptFormat(tokenizer, template.name).text([Turn(_USER1, _ANSWER1), Turn(_USER2, _ANSWER2)])


def foreign_markers(tokenizer, template: Template) -> list[str]:
    """The template's markers that the tokenizer neither holds as one token nor uses in its chat_template."""
    own = _chat_template_text(tokenizer)
    literal = "".join((template.prefix, template.system, template.instruction, template.separator,
                       template.suffix)).replace("{system}", " ").replace("{input}", " ").replace("{round}", " ")
    out: list[str] = []
    for marker in _MARKER.findall(literal):
        if marker in out or marker in own:
            continue
        if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
            out.append(marker)
    return out


def _shown(rendering: str | None) -> str:
    """The tokenizer's layout as a user reads it: from the first user message to the second, '…' for text."""
    if rendering is None:
        return "its chat_template"
    start, end = rendering.find(_USER1), rendering.find(_USER2) + len(_USER2)
    piece = rendering[start:end]
    for word in (_USER1, _ANSWER1, _USER2):
        piece = piece.replace(word, "…")
    return f"turns like {piece!r}"


def matching_templates(tokenizer, rendering: str | None) -> list[str]:
    """tunelab's templates that lay turns out as the tokenizer's chat_template does, with no foreign marker."""
    layout = _between_messages(rendering) if rendering else None
    if layout is None:
        return []
    return [name for name, t in sorted(TEMPLATES.items())
            if _between_messages(_template_rendering(tokenizer, t)) == layout and not foreign_markers(tokenizer, t)]


def check_template_fit(tokenizer, template_name: str, model: str, check: bool = True) -> TemplateFit:
    """The verdict for training `template_name` on `model`'s tokenizer; raises ConfigError (one line: both
    formats and the fix) on a conflict unless `check` is False."""
    if template_name == "auto":
        return TemplateFit("auto", "prompt_template 'auto': training in the chat_template of the model's tokenizer")
    if not _chat_template_text(tokenizer):
        return TemplateFit("base", f"prompt_template '{template_name}': the model's tokenizer has no chat_template "
                                   f"of its own (a base model), so the model learns '{template_name}'")
    template = get_template(template_name)
    rendering = _tokenizer_rendering(tokenizer)
    foreign = foreign_markers(tokenizer, template)
    if foreign:
        fits = matching_templates(tokenizer, rendering)
        also = f" (tunelab's {', '.join(repr(n) for n in fits[:3])} also write it)" if fits else ""
        text = (f"prompt_template '{template_name}' does not fit {model}: it writes {', '.join(foreign[:6])}, which "
                f"the model's tokenizer neither holds as tokens nor uses in its own chat format ({_shown(rendering)})")
        if check:
            raise ConfigError(f"{text}; set prompt_template = 'auto' to train in the model's own format{also}, or "
                              f"prompt_template_check = False to keep '{template_name}' on purpose")
        return TemplateFit("conflict", f"warning: {text}; kept on purpose (prompt_template_check = False)")
    ours = _template_rendering(tokenizer, template)
    theirs = _between_messages(rendering) if rendering else None
    if theirs is not None and _between_messages(ours) == theirs:
        return TemplateFit("match", f"prompt_template '{template_name}' lays turns out as the chat_template of the "
                                    f"model's tokenizer does")
    return TemplateFit("differs", f"prompt_template '{template_name}' lays turns out unlike the chat_template of the "
                                  f"model's tokenizer ({_shown(rendering)}) but writes only markers it knows; "
                                  f"training with '{template_name}' (prompt_template = 'auto' follows the tokenizer)")
