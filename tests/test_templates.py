"""Prompt templates: the table's invariants, and template_to_jinja rendering exactly what the
string-format rule gives (in transformers' own sandboxed Jinja environment and in plain jinja2)."""
from __future__ import annotations

import dataclasses
import string

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.config.templates import (
    TEMPLATES, Template, UnknownTemplateError, get_template, template_names, template_to_jinja)

BOS, EOS = '<s>', '</s>'
REQUIRED = ('default zephyr internlm_chat internlm2_chat moss_sft llama2_chat code_llama_chat chatglm2 '
            'chatglm3 qwen_chat baichuan_chat baichuan2_chat wizardlm llama3_chat mistral gemma phi3_chat '
            'deepseek cohere minicpm vicuna').split()
ALL = list(TEMPLATES)

SYSTEM = 'Be brief. {not a field} "quoted" \\ {{ x }} {% raw %}'
TURNS = [('What is 2+2? {input} {round}', 'It is 4. }} %}'), ("And 'twice' that?\nThanks", 'Eight.')]


def reference(t: Template, turns, system: str | None = None, bos: str = BOS, eos: str = EOS) -> str:
    """The documented rule; a turn whose output is None ends the text at its prompt."""
    text = (bos if t.bos else '') + t.prefix
    system = system or t.default_system
    block = t.system.format(system=system) if t.system and system else ''
    if not t.system_in_instruction:
        text += block
    for i, (inp, out) in enumerate(turns):
        if i:
            text += t.separator
        if i == 0 and t.system_in_instruction:
            inp = block + inp
        text += t.instruction.format(input=inp, round=i + 1)
        if i == len(turns) - 1:
            text += t.last_answer_prefix
        if out is None:
            break
        text += out
        if t.end_history_turns or i == len(turns) - 1:
            text += t.suffix or eos
    return text


def messages(turns, system: str | None = None) -> list[dict]:
    msgs = [{'role': 'system', 'content': system}] if system is not None else []
    for inp, out in turns:
        msgs.append({'role': 'user', 'content': inp})
        if out is not None:
            msgs.append({'role': 'assistant', 'content': out})
    return msgs


def render_hf(t: Template, msgs, add_generation_prompt: bool = False, bos: str = BOS, eos: str = EOS) -> str:
    """As tokenizer.apply_chat_template(tokenize=False) renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[msgs], chat_template=template_to_jinja(t),
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=bos, eos_token=eos)
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


# -- names and errors -----------------------------------------------------------------------------

def test_template_names():
    names = template_names()
    assert names[:-1] == sorted(TEMPLATES) and names[-1] == 'auto'


def test_auto_is_not_a_template_and_says_so():
    """'auto' is resolved to the tokenizer's own chat_template before any Template is asked for: asking for it
    says what it means and lists the names that are templates."""
    with pytest.raises(UnknownTemplateError) as err:
        get_template('auto')
    assert "tokenizer's own chat_template" in str(err.value) and 'qwen_chat' in str(err.value)


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
    assert text == ('[gMASK]sop[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：c\n\n答：d'
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


# -- published formats: every template, two turns with a system prompt ----------------------------
#
# Each string below is the model's published chat format (its tokenizer_config chat_template or its own
# repo code) for [system 'You are brief.', user 'Hi', assistant 'Hello', user 'Bye', assistant 'Goodbye'],
# written with the model's real bos/eos tokens, under the module's conventions: an answer's leading space
# (after '[/INST]', 'ASSISTANT:', 'Assistant:', '<|MOSS|>:') belongs to the answer, the text ends at the
# last end-of-turn marker (no trailing newline), and a model with no system slot keeps the system text where
# tunelab documents it (the template's notes).

SYS = 'You are brief.'
TWO_TURNS = [('Hi', 'Hello'), ('Bye', 'Goodbye')]
DS_BOS, DS_EOS = '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>'

# name -> (bos token, eos token, the rendering)
WITH_SYSTEM: dict[str, tuple[str, str, str]] = {
    'default': ('<s>', '</s>',
                '<s><|System|>:You are brief.\n<|User|>:Hi\n<|Bot|>:Hello</s>\n<|User|>:Bye\n<|Bot|>:Goodbye</s>'),
    'zephyr': ('<s>', '</s>',
               '<s><|system|>\nYou are brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n'
               '<|user|>\nBye</s>\n<|assistant|>\nGoodbye</s>'),
    'internlm_chat': ('<s>', '</s>',
                      '<s><|System|>:You are brief.\n<|User|>:Hi<eoh>\n<|Bot|>:Hello<eoa>\n'
                      '<|User|>:Bye<eoh>\n<|Bot|>:Goodbye<eoa>'),
    'internlm2_chat': ('<s>', '</s>',
                       '<s><|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                       '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
                       '<|im_start|>assistant\nGoodbye<|im_end|>'),
    'moss_sft': ('', '<eom>',
                 'You are brief.\n<|Human|>: Hi<eoh>\n<|MOSS|>:Hello<eom>\n<|Human|>: Bye<eoh>\n<|MOSS|>:Goodbye<eom>'),
    # Meta puts the <<SYS>> block inside the first [INST]
    'llama2_chat': ('<s>', '</s>',
                    '<s>[INST] <<SYS>>\nYou are brief.\n<</SYS>>\n\nHi [/INST]Hello</s><s>[INST] Bye [/INST]Goodbye</s>'),
    'code_llama_chat': ('<s>', '</s>',
                        '<s>[INST] <<SYS>>\nYou are brief.\n<</SYS>>\n\nHi [/INST]Hello</s><s>[INST] Bye [/INST]'
                        'Goodbye</s>'),
    # ChatGLM2 has no system slot (the text is a preamble after the [gMASK]sop prefix); no eos between turns
    'chatglm2': ('', '</s>',
                 '[gMASK]sopYou are brief.\n\n[Round 1]\n\n问：Hi\n\n答：Hello\n\n[Round 2]\n\n问：Bye\n\n答：Goodbye</s>'),
    'chatglm3': ('', '</s>',
                 '[gMASK]sop<|system|>\nYou are brief.<|user|>\nHi<|assistant|>\nHello<|user|>\nBye<|assistant|>\n'
                 'Goodbye</s>'),
    'glm4_chat': ('', '<|endoftext|>',
                  '[gMASK]<sop><|system|>\nYou are brief.<|user|>\nHi<|assistant|>\nHello<|user|>\nBye<|assistant|>\n'
                  'Goodbye<|endoftext|>'),
    'qwen_chat': ('', '<|endoftext|>',
                  '<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                  '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
                  '<|im_start|>assistant\nGoodbye<|im_end|>'),
    'chatml': ('', '<|endoftext|>',
               '<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
               '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
               '<|im_start|>assistant\nGoodbye<|im_end|>'),
    # Qwen3 in non-thinking mode: the last answer opens with the empty think block
    'qwen3': ('', '<|im_end|>',
              '<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
              '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
              '<|im_start|>assistant\n<think>\n\n</think>\n\nGoodbye<|im_end|>'),
    'yi_chat': ('', '<|endoftext|>',
                '<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
                '<|im_start|>assistant\nGoodbye<|im_end|>'),
    # Baichuan-13B-Chat has no system slot (preamble); Baichuan2-Chat writes the system text first, as is
    'baichuan_chat': ('', '</s>',
                      'You are brief.<reserved_102>Hi<reserved_103>Hello</s><reserved_102>Bye<reserved_103>Goodbye</s>'),
    'baichuan2_chat': ('', '</s>',
                       'You are brief.<reserved_106>Hi<reserved_107>Hello</s><reserved_106>Bye<reserved_107>Goodbye</s>'),
    'vicuna': ('<s>', '</s>', '<s>You are brief. USER: Hi ASSISTANT:Hello</s>USER: Bye ASSISTANT:Goodbye</s>'),
    'wizardlm': ('<s>', '</s>', '<s>You are brief. USER: Hi ASSISTANT:Hello</s>USER: Bye ASSISTANT:Goodbye</s>'),
    'llama3_chat': ('<|begin_of_text|>', '<|eot_id|>',
                    '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are brief.<|eot_id|>'
                    '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
                    '<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>'
                    '<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>'
                    '<|start_header_id|>assistant<|end_header_id|>\n\nGoodbye<|eot_id|>'),
    # Mistral's template puts the system text inside the first [INST]
    'mistral': ('<s>', '</s>', '<s>[INST] You are brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]Goodbye</s>'),
    'mixtral': ('<s>', '</s>', '<s>[INST] You are brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]Goodbye</s>'),
    # Mistral v0.3 and the tekken models: no space before [/INST] (v0.3 keeps the one after [INST]); tunelab
    # puts the system text in the first [INST]
    'mistral_v3': ('<s>', '</s>', '<s>[INST] You are brief.\n\nHi[/INST]Hello</s>[INST] Bye[/INST]Goodbye</s>'),
    'mistral_tekken': ('<s>', '</s>', '<s>[INST]You are brief.\n\nHi[/INST]Hello</s>[INST]Bye[/INST]Goodbye</s>'),
    # Gemma 3 opens the first user turn with the system text and a blank line
    'gemma3': ('<bos>', '<eos>',
               '<bos><start_of_turn>user\nYou are brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n'
               '<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nGoodbye<end_of_turn>'),
    'phi4': ('<|endoftext|>', '<|im_end|>',
             '<|im_start|>system<|im_sep|>You are brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>'
             '<|im_start|>assistant<|im_sep|>Hello<|im_end|><|im_start|>user<|im_sep|>Bye<|im_end|>'
             '<|im_start|>assistant<|im_sep|>Goodbye<|im_end|>'),
    'phi4_mini': ('<|endoftext|>', '<|endoftext|>',
                  '<|system|>You are brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>Bye<|end|>'
                  '<|assistant|>Goodbye<|end|>'),
    # Gemma has no system role; the system turn is XTuner's extension
    'gemma': ('<bos>', '<eos>',
              '<bos><start_of_turn>system\nYou are brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n'
              '<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n'
              '<start_of_turn>model\nGoodbye<end_of_turn>'),
    'phi3_chat': ('<s>', '<|endoftext|>',
                  '<s><|system|>\nYou are brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n'
                  '<|user|>\nBye<|end|>\n<|assistant|>\nGoodbye<|end|>'),
    'deepseek': (DS_BOS, DS_EOS,
                 f'{DS_BOS}You are brief.\n\nUser: Hi\n\nAssistant:Hello{DS_EOS}User: Bye\n\nAssistant:Goodbye{DS_EOS}'),
    'deepseek_v2': (DS_BOS, DS_EOS,
                    f'{DS_BOS}You are brief.\n\nUser: Hi\n\nAssistant:Hello{DS_EOS}User: Bye\n\nAssistant:Goodbye{DS_EOS}'),
    # a given system text is written as is, with no newline (only the built-in default ends in one)
    'deepseek_coder': (DS_BOS, '<|EOT|>',
                       f'{DS_BOS}You are brief.### Instruction:\nHi\n### Response:\nHello\n<|EOT|>\n'
                       '### Instruction:\nBye\n### Response:\nGoodbye\n<|EOT|>'),
    'cohere': ('<BOS_TOKEN>', '<|END_OF_TURN_TOKEN|>',
               '<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are brief.<|END_OF_TURN_TOKEN|>'
               '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>'
               '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello<|END_OF_TURN_TOKEN|>'
               '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|>'
               '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Goodbye<|END_OF_TURN_TOKEN|>'),
    'minicpm': ('<s>', '</s>', '<s>You are brief.<用户>Hi<AI>Hello</s><用户>Bye<AI>Goodbye</s>'),
}

# ChatGLM2 without a system text: exactly its build_prompt output after the [gMASK]sop prefix
CHATGLM2_PUBLISHED = '[gMASK]sop[Round 1]\n\n问：Hi\n\n答：Hello\n\n[Round 2]\n\n问：Bye\n\n答：Goodbye</s>'


def test_chatglm2_without_system_is_published_text():
    assert reference(TEMPLATES['chatglm2'], TWO_TURNS, None, '', '</s>') == CHATGLM2_PUBLISHED


@pytest.fixture(scope='module')
def tiny_tokenizer():
    from tunelab.model.tiny import build_tokenizer
    return build_tokenizer()


def test_every_template_has_a_published_expectation():
    assert sorted(WITH_SYSTEM) == sorted(TEMPLATES)


@pytest.mark.parametrize('name', ALL)
def test_two_turns_with_system_match_published_format(name, tiny_tokenizer):
    from tunelab.data.encode import PromptFormat
    from tunelab.data.formats import Turn

    t = TEMPLATES[name]
    bos, eos, expected = WITH_SYSTEM[name]
    # the documented rule and the exported Hugging Face chat_template
    assert reference(t, TWO_TURNS, SYS, bos, eos) == expected
    assert render_hf(t, messages(TWO_TURNS, SYS), bos=bos, eos=eos) == expected
    # the encoder (what training sees), with the tiny tokenizer's <s> and </s> in place of the model's
    tiny = ('<s>' + expected[len(bos):]) if t.bos else expected
    if not t.suffix:
        tiny = tiny.replace(eos, '</s>')
    encoder = PromptFormat(tiny_tokenizer, name, system=SYS)
    assert encoder.render([Turn(i, o) for i, o in TWO_TURNS]) == tiny


def test_deepseek_coder_default_system_is_published_text():
    t = TEMPLATES['deepseek_coder']
    assert reference(t, [('Hi', None)], bos=DS_BOS) == (
        f'{DS_BOS}You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek '
        'Company, and you only answer questions related to computer science. For politically sensitive questions, '
        'security and privacy issues, and other non-computer science questions, you will refuse to answer\n'
        '### Instruction:\nHi\n### Response:\n')


# -- published formats, no system, generation prompt (spot checks) ---------------------------------

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
    'vicuna': ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:Hello</s>"
               "USER: Bye ASSISTANT:"),
    'cohere': ('<s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>'
               '<|CHATBOT_TOKEN|>Hello<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye'
               '<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'),
    'internlm_chat': '<s><|User|>:Hi<eoh>\n<|Bot|>:Hello<eoa>\n<|User|>:Bye<eoh>\n<|Bot|>:',
    'deepseek_coder': ('<s>You are an AI programming assistant, utilizing the Deepseek Coder model, developed by '
                       'Deepseek Company, and you only answer questions related to computer science. For politically '
                       'sensitive questions, security and privacy issues, and other non-computer science questions, '
                       'you will refuse to answer\n### Instruction:\nHi\n### Response:\nHello\n<|EOT|>\n'
                       '### Instruction:\nBye\n### Response:\n'),
    'baichuan2_chat': '<reserved_106>Hi<reserved_107>Hello</s><reserved_106>Bye<reserved_107>',
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_format(name):
    t = TEMPLATES[name]
    turns = [('Hi', 'Hello'), ('Bye', None)]
    assert reference(t, turns) == PUBLISHED[name]
    assert render_hf(t, messages(turns), add_generation_prompt=True) == PUBLISHED[name]


# -- 'auto': the tokenizer's own chat_template --------------------------------------------------------

# ChatML with a default system message when the conversation has none (written for these tests)
CHATML_WITH_DEFAULT = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a test bot.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

# puts the number of messages first, so a longer conversation changes the text of the earlier turns
COUNTING = (
    "{{- 'messages: ' ~ (messages | length) ~ '\\n' -}}"
    "{%- for message in messages -%}{{- message['role'] + ': ' + message['content'] + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}")


def _auto(tokenizer, template: str, system: str = ''):
    import copy

    from tunelab.data.encode import PromptFormat

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok, PromptFormat(tok, 'auto', system=system)


def _trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != -100])


def test_auto_masks_prompts_and_uses_template_default_system(tiny_tokenizer):
    from tunelab.data.formats import Turn

    tok, fmt = _auto(tiny_tokenizer, CHATML_WITH_DEFAULT)
    ids, labels = fmt.encode([Turn('Hi', 'Hello'), Turn('Bye', 'Goodbye')])
    assert len(ids) == len(labels)
    assert tok.decode(ids) == (
        '<|im_start|>system\nYou are a test bot.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
        '<|im_start|>assistant\nGoodbye<|im_end|>\n')
    assert _trained_text(tok, ids, labels) == 'Hello<|im_end|>\nGoodbye<|im_end|>\n'
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    first = next(k for k, label in enumerate(labels) if label != -100)
    assert tok.decode(ids[:first]) == (
        '<|im_start|>system\nYou are a test bot.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\n')
    # the end-of-turn marker the chat loop stops at comes from the template too
    assert fmt.stop_words[0] == '<|im_end|>'


def test_auto_with_system_and_open_last_turn(tiny_tokenizer):
    from tunelab.data.formats import Turn

    tok, fmt = _auto(tiny_tokenizer, CHATML_WITH_DEFAULT, system='Be terse.')
    turns = [Turn('Hi', 'Hello'), Turn('Bye', 'Goodbye')]
    ids, labels = fmt.encode(turns)
    assert tok.decode(ids) == (
        '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
        '<|im_start|>assistant\nGoodbye<|im_end|>\n')
    assert _trained_text(tok, ids, labels) == 'Hello<|im_end|>\nGoodbye<|im_end|>\n'
    # the prompt a model continues at chat time ends with the generation prompt
    ids, labels = fmt.encode(turns, open_last=True)
    assert tok.decode(ids) == (
        '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n')
    assert _trained_text(tok, ids, labels) == 'Hello<|im_end|>\n'


def test_auto_rejects_template_that_does_not_render_incrementally(tiny_tokenizer):
    from tunelab.data.formats import Turn
    from tunelab.errors import DataError

    _, fmt = _auto(tiny_tokenizer, COUNTING)
    with pytest.raises(DataError, match='incrementally'):
        fmt.encode([Turn('Hi', 'Hello'), Turn('Bye', 'Goodbye')])


def test_auto_needs_a_chat_template(tiny_tokenizer):
    from tunelab.data.encode import PromptFormat
    from tunelab.errors import DataError

    assert not tiny_tokenizer.chat_template
    with pytest.raises(DataError, match='no chat_template'):
        PromptFormat(tiny_tokenizer, 'auto')
