"""`tunelab convert gguf --ollama`: an Ollama Modelfile beside the GGUF, whose TEMPLATE renders the trained prompt
format in Ollama's Go text/template syntax, with the trained SYSTEM text and a PARAMETER stop per stop word.

Ollama renders TEMPLATE with .System (the system messages, else SYSTEM) and .Messages (role, content); a template
that uses .Messages gets the whole conversation at once. Literal text is written as quoted Go strings, so newlines
and markers survive exactly, and every action opens with `{{-`, so the line breaks between actions add no text. Go's
templates have no arithmetic: the turn number is the length of a string that grows by one dot per user message.
Ollama adds the bos token itself where the GGUF says so (tokenizer.ggml.add_bos_token), so TEMPLATE leaves it out.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

from tunelab.config.templates import Template
from tunelab.errors import UserError
from tunelab.fsutil import temp_file_beside

ROUND = "(len $round)"  # the 1-based number of the current user turn


def _go(text: str) -> str:
    """A Go template action printing `text` literally (JSON string escapes are valid Go string escapes)."""
    return "{{- " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fill(fmt: str, fields: dict[str, str]) -> str:
    """A format string such as '<|User|>:{input}<eoh>\\n' with its {fields} as the given Go actions."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        out.append(_go(literal))
        if field is not None:
            out.append(fields[field])
    return "".join(out)


def go_template(t: Template, eos_token: str) -> str:
    """TEMPLATE for an Ollama Modelfile: `t`'s prompt for the conversation in .Messages, ending with the
    assistant header of the last user turn."""
    end = t.suffix or eos_token
    system_block = _fill(t.system, {"system": "{{- $.System }}"}) if t.system else ""
    lines = ['{{- $round := "" }}']
    if t.last_answer_prefix:
        lines.append('{{- $users := "" }}{{- range .Messages }}{{- if eq .Role "user" }}'
                     '{{- $users = print $users "." }}{{- end }}{{- end }}')
    if t.prefix:
        lines.append(_go(t.prefix))
    if system_block and not t.system_in_instruction:
        lines.append("{{- if .System }}" + system_block + "{{- end }}")
    lines += ["{{- range $i, $m := .Messages }}",
              '{{- if eq .Role "user" }}{{- $round = print $round "." }}']
    if t.separator:
        lines.append("{{- if gt " + ROUND + " 1 }}" + _go(t.separator) + "{{- end }}")
    user = "{{- .Content }}"
    if system_block and t.system_in_instruction:
        user = "{{- if and (eq " + ROUND + " 1) $.System }}" + system_block + "{{- end }}" + user
    lines.append(_fill(t.instruction, {"input": user, "round": "{{- " + ROUND + " }}"}))
    if t.last_answer_prefix:
        lines.append("{{- if eq " + ROUND + " (len $users) }}" + _go(t.last_answer_prefix) + "{{- end }}")
    ending = _go(end) if t.end_history_turns else \
        "{{- if eq (len (slice $.Messages $i)) 1 }}" + _go(end) + "{{- end }}"  # only the conversation's last answer
    lines += ['{{- else if eq .Role "assistant" }}{{- .Content }}' + ending,
              "{{- end }}",
              "{{- end }}"]
    return "\n".join(lines)


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise UserError(f"--ollama: the {what} holds '\"\"\"', which a Modelfile cannot quote; change it")
    return '"""' + value + '"""'


def modelfile(gguf_name: str, template: Template | None, system: str, eos_token: str) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, SYSTEM and the stop words."""
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append("TEMPLATE " + _quoted(go_template(template, eos_token), "template"))
    if system:
        lines.append("SYSTEM " + _quoted(system, "system text"))
    stops = list(template.stop_words) if template is not None else []
    if template is not None and not template.suffix and eos_token and eos_token not in stops:
        stops.append(eos_token)
    for word in stops:
        lines.append("PARAMETER stop " + (json.dumps(word, ensure_ascii=False) if '"' not in word
                                          else _quoted(word, "stop word")))
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, template: Template | None, system: str, eos_token: str) -> Path:
    """Modelfile in the GGUF's folder (written whole or not at all)."""
    target = gguf_path.parent / "Modelfile"
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(modelfile(gguf_path.name, template, system, eos_token))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
