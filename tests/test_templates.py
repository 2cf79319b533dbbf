"""Prompt templates: the table's invariants, and template_to_jinja rendering exactly what the
string-format rule gives (in transformers' own sandboxed Jinja environment and in plain jinja2)."""
from __future__ import annotations

import dataclasses
import string

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.data.templates import (
    TEMPLATES, Template, UnknownTemplateError, get_template, template_names, template_to_jinja)

BOS, EOS = '<s>', '</s>'
REQUIRED = ('default zephyr internlm_chat internlm2_chat moss_sft llama2_chat code_llama_chat chatglm2 '
            'chatglm3 qwen_chat baichuan_chat baichuan2_chat wizardlm llama3_chat mistral gemma phi3_chat '
            'deepseek cohere minicpm vicuna').split()
ALL = list(TEMPLATES)

SYSTEM = 'Be brief. {not a field} "quoted" \\ {{ x }} {% raw %}'
TURNS = [('What is 2+2? {input} {round}', 'It is 4. }} %}'), ("And 'twice' that?\nThanks", 'Eight.')]


def reference(t: Template, turns, system: str | None = None) -> str:
    """The documented rule; a turn whose output is None ends the text at its prompt."""
    text = BOS if t.bos else ''
    system = system or t.default_system
    if t.system and system:
        text += t.system.format(system=system)
    for i, (inp, out) in enumerate(turns):
        if i:
            text += t.separator
        text += t.instruction.format(input=inp, round=i + 1)
        if out is None:
            break
        text += out + (t.suffix or EOS)
    return text


def messages(turns, system: str | None = None) -> list[dict]:
    msgs = [{'role': 'system', 'content': system}] if system is not None else []
    for inp, out in turns:
        msgs.append({'role': 'user', 'content': inp})
        if out is not None:
            msgs.append({'role': 'assistant', 'content': out})
    return msgs


def render_hf(t: Template, msgs, add_generation_prompt: bool = False) -> str:
    """As tokenizer.apply_chat_template(tokenize=False) renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[msgs], chat_template=template_to_jinja(t),
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=BOS, eos_token=EOS)
    return rendered[0]


def render_plain(t: Template, msgs, add_generation_prompt: bool = False) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=['jinja2.ext.loopcontrols'])
    return env.from_string(template_to_jinja(t)).render(
        messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)


# -- the table --------------------------------------------------------------------------------------

def test_required_templates_present_and_named_by_key():
    assert not set(REQUIRED) - set(TEMPLATES)
    assert 'auto' not in TEMPLATES
    assert list(TEMPLATES)[0] == 'default'
    for name, t in TEMPLATES.items():
        assert isinstance(t, Template) and t.name == name


@pytest.mark.parametrize('name', ALL)
def test_template_fields(name):
    t = TEMPLATES[name]
    assert '{input}' in t.instruction
    fields = {f for _, f, _, _ in string.Formatter().parse(t.instruction) if f is not None}
    assert fields <= {'input', 'round'}
    if t.system:
        assert '{system}' in t.system
        assert t.system.format(system='S') == t.system.replace('{system}', 'S')
    # no brace escapes: str.replace (used by the encoder) and str.format must agree
    assert t.instruction.format(input='I', round=3) == t.instruction.replace('{input}', 'I').replace('{round}', '3')
    for text in (t.suffix, t.separator, t.default_system):
        assert '{' not in text and '}' not in text
    assert isinstance(t.stop_words, tuple) and all(isinstance(w, str) and w for w in t.stop_words)
    if t.suffix:  # the end-of-turn marker must stop generation
        assert t.suffix.strip() in t.stop_words
    assert t.notes and '\n' not in t.notes
    assert isinstance(t.bos, bool)


def test_template_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEMPLATES['default'].suffix = 'x'


# -- names and errors -----------------------------------------------------------------------------

def test_template_names():
    names = template_names()
    assert names[:-1] == sorted(TEMPLATES) and names[-1] == 'auto'


def test_get_template():
    for name in ALL:
        assert get_template(name) is TEMPLATES[name]


def test_unknown_template_lists_valid_names():
    with pytest.raises(UnknownTemplateError) as err:
        get_template('qwen_chatt')
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert msg.startswith("unknown prompt template 'qwen_chatt'; valid names: ")
    assert msg.endswith(', '.join(template_names()))
    assert 'auto' in msg and all(name in msg for name in ALL)


def test_auto_is_not_a_template():
    with pytest.raises(UnknownTemplateError, match='auto'):
        get_template('auto')


# -- Jinja export -----------------------------------------------------------------------------------

@pytest.mark.parametrize('render', [render_hf, render_plain], ids=['transformers', 'jinja2'])
@pytest.mark.parametrize('name', ALL)
def test_jinja_matches_format_rule(name, render):
    t = TEMPLATES[name]
    full = reference(t, TURNS, SYSTEM)
    assert render(t, messages(TURNS, SYSTEM)) == full
    # no system message: the default system (if any) is used
    assert render(t, messages(TURNS)) == reference(t, TURNS)
    # generation prompt: everything up to the second answer
    open_turns = [TURNS[0], (TURNS[1][0], None)]
    prompt = reference(t, open_turns, SYSTEM)
    assert full.startswith(prompt) and full[len(prompt):] == TURNS[1][1] + (t.suffix or EOS)
    assert render(t, messages(open_turns, SYSTEM), add_generation_prompt=True) == prompt


def test_jinja_round_numbers_and_separator():
    t = TEMPLATES['chatglm2']
    text = render_hf(t, messages([('a', 'b'), ('c', 'd'), ('e', None)]), add_generation_prompt=True)
    assert text == ('<s>[Round 1]\n\n问：a\n\n答：b</s>\n\n[Round 2]\n\n问：c\n\n答：d</s>'
                    '\n\n[Round 3]\n\n问：e\n\n答：')


def test_jinja_escapes_literal_text():
    odd = Template('odd', system='{{sys}} "{system}" \\n\\\'', instruction="{{% if %}}}}}} '{input}' {{# {round} #}}",
                   suffix='"}}\'', separator='{%- -%}\n\t', stop_words=('"}}\'',), default_system='d"\'{}')
    turns = [('x', 'y'), ('z', 'w')]
    for system in (None, 'S'):
        expected = reference(odd, turns, system)
        assert render_hf(odd, messages(turns, system)) == expected
        assert render_plain(odd, messages(turns, system)) == expected


def test_jinja_without_system_slot_drops_system_message():
    bare = dataclasses.replace(TEMPLATES['default'], system='', bos=False)
    assert render_hf(bare, messages([('u', 'a')], 'S')) == '<|User|>:u\n<|Bot|>:a</s>'


def test_jinja_default_system_override():
    t = dataclasses.replace(TEMPLATES['qwen_chat'], default_system='Custom.')
    assert render_hf(t, messages([('u', None)]), add_generation_prompt=True) == (
        '<|im_start|>system\nCustom.<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n')


def test_jinja_rejects_misplaced_system_message():
    msgs = [{'role': 'user', 'content': 'u'}, {'role': 'system', 'content': 's'}]
    with pytest.raises(jinja2.TemplateError):
        render_hf(TEMPLATES['qwen_chat'], msgs)


# -- published formats (spot checks) --------------------------------------------------------------

PUBLISHED = {
    'qwen_chat': ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                  '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n'),
    'internlm2_chat': ('<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n'
                       '<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n'),
    'llama3_chat': ('<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant'
                    '<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>'
                    '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    'mistral': '<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]',
    'llama2_chat': '<s>[INST] Hi [/INST]Hello</s><s>[INST] Bye [/INST]',
    'gemma': ('<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n'
              '<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n'),
    'phi3_chat': '<s><|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n',
    'zephyr': '<s><|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n',
    'deepseek': '<s>User: Hi\n\nAssistant:Hello</s>User: Bye\n\nAssistant:',
    'vicuna': f'<s>{TEMPLATES["vicuna"].default_system} USER: Hi ASSISTANT:Hello</s>USER: Bye ASSISTANT:',
    'cohere': ('<s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>'
               '<|CHATBOT_TOKEN|>Hello<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye'
               '<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'),
    'internlm_chat': '<s><|User|>:Hi<eoh>\n<|Bot|>:Hello<eoa>\n<|User|>:Bye<eoh>\n<|Bot|>:',
    'deepseek_coder': (f'<s>{TEMPLATES["deepseek_coder"].default_system}\n### Instruction:\nHi\n### Response:\n'
                       'Hello\n<|EOT|>\n### Instruction:\nBye\n### Response:\n'),
    'baichuan2_chat': '<reserved_106>Hi<reserved_107>Hello</s><reserved_106>Bye<reserved_107>',
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_format(name):
    t = TEMPLATES[name]
    turns = [('Hi', 'Hello'), ('Bye', None)]
    assert reference(t, turns) == PUBLISHED[name]
    assert render_hf(t, messages(turns), add_generation_prompt=True) == PUBLISHED[name]
