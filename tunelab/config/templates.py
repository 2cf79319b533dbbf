"""Prompt templates: how a dialogue is laid out as text for each chat model family.

A dialogue [(system, in1, out1), (in2, out2), ...] renders as

    prefix + system.format(system=...) + instruction.format(input=in1, round=1) + out1 + suffix
    + separator + instruction.format(input=in2, round=2) + out2 + suffix + ...

with the tokenizer's bos token in front when `bos` is True and its eos token after each output when
`suffix` is ''. Three switches cover the formats that do not fit that line: `system_in_instruction` puts
the system block inside the first instruction, in front of in1 (Llama-2, current Mistral),
`end_history_turns=False` ends only the last answer (ChatGLM writes nothing between turns), and
`last_answer_prefix` is prompt text put before the last answer only (Qwen3 closes an empty think block there).
Each template reproduces its model's published chat format (the HF tokenizer_config
chat_template or the model's own repo) within what that scheme can express. Conventions:

* The prompt ends where the published generation prompt ends. Where a published template writes a
  space between the assistant marker and the answer (`[/INST] A`, `ASSISTANT: A`, `Assistant: A`),
  that space is left to the answer, so the prompt stays exact for generation. Sentencepiece
  tokenizers (llama2, mistral, vicuna) add it back when the answer is tokenised on its own; for
  byte-level BPE ones (deepseek, moss) the answer's first token just lacks its leading space.
* Models with no system slot keep the system text as a plain preamble (or XTuner's extension for
  gemma) rather than dropping it; `notes` says so.
* Literal text holds no `{` or `}` beyond the placeholders, so `str.replace` and `str.format` agree.
"""
from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """A chat prompt format, in XTuner's style."""
    name: str
    system: str          # format string with {system}; '' if the model has no system slot (then the system text is dropped)
    instruction: str     # format string with {input} and optionally {round} (1-based turn number)
    suffix: str          # appended after every assistant output, i.e. the end-of-turn marker; '' means "use the tokenizer's eos token"
    separator: str       # text put before each instruction from the second turn on
    stop_words: tuple[str, ...]   # strings at which generation must stop (the end-of-turn markers); may be empty when suffix == '' (eos is the stop then)
    default_system: str = ''      # system text the model was published with, used when neither data nor config gives one ('' = none)
    bos: bool = True     # whether the tokenizer's bos token starts a dialogue (False for formats whose published template puts no bos, e.g. qwen)
    prefix: str = ''     # literal text that starts every dialogue, after the bos token (ChatGLM's [gMASK]sop)
    system_in_instruction: bool = False  # the system block goes inside the first instruction, before the input (Llama-2's <<SYS>>)
    end_history_turns: bool = True       # False: only the dialogue's last answer gets the suffix/eos (ChatGLM writes none between turns)
    last_answer_prefix: str = ''         # prompt text before the last answer only (Qwen3's empty <think> block, its non-thinking mode)
    notes: str = ''      # one line: which published format this follows


TEMPLATES: dict[str, Template] = {}


def _add(t: Template) -> Template:
    TEMPLATES[t.name] = t
    return t


def _alias(name: str, of: Template, notes: str) -> Template:
    return _add(dataclasses.replace(of, name=name, notes=notes))


_CHATML_SYS = '<|im_start|>system\n{system}<|im_end|>\n'
_CHATML_INST = '<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n'
_VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_DEEPSEEK_CODER_SYS = (
    'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek '
    'Company, and you only answer questions related to computer science. For politically sensitive '
    'questions, security and privacy issues, and other non-computer science questions, you will refuse to '
    'answer\n')  # the published default ends in a newline; a system text the user gives is written as is

_add(Template(
    'default', system='<|System|>:{system}\n', instruction='<|User|>:{input}\n<|Bot|>:',
    suffix='', separator='\n', stop_words=(),
    notes="XTuner's generic format for base models: <|User|>:/<|Bot|>: lines, eos ends each answer"))
_add(Template(
    'zephyr', system='<|system|>\n{system}</s>\n', instruction='<|user|>\n{input}</s>\n<|assistant|>\n',
    suffix='', separator='\n', stop_words=(),
    notes='HuggingFaceH4/zephyr-7b-beta chat_template (every message closed by </s> and a newline)'))
_add(Template(
    'internlm_chat', system='<|System|>:{system}\n', instruction='<|User|>:{input}<eoh>\n<|Bot|>:',
    suffix='<eoa>', separator='\n', stop_words=('<eoa>',),
    notes='internlm-chat-7b (InternLM 1) <|User|>:...<eoh> / <|Bot|>:...<eoa> format'))
internlm2_chat = _add(Template(
    'internlm2_chat', system=_CHATML_SYS, instruction=_CHATML_INST,
    suffix='<|im_end|>', separator='\n', stop_words=('<|im_end|>',),
    notes='internlm2/2.5/3 chat: ChatML after the bos token <s>, no default system in the chat_template'))
_add(Template(
    'moss_sft', system='{system}\n', instruction='<|Human|>: {input}<eoh>\n<|MOSS|>:',
    suffix='<eom>', separator='\n', stop_words=('<eom>', '<eoc>'), bos=False,
    notes="fnlp/moss-moon-003-sft README: meta instruction, '<|Human|>: ...<eoh>\\n<|MOSS|>: ...<eom>'"))
llama2_chat = _add(Template(
    'llama2_chat', system='<<SYS>>\n{system}\n<</SYS>>\n\n', instruction='[INST] {input} [/INST]',
    suffix='', separator='<s>', stop_words=(), system_in_instruction=True,
    notes='Llama-2-chat: <s>[INST] <<SYS>>..<</SYS>> u [/INST] a</s><s>[INST] ...; system inside the first [INST]'))
_alias('code_llama_chat', llama2_chat,
       'CodeLlama-Instruct: same layout as Llama-2-chat (bos before every [INST], <<SYS>> in the first)')
_add(Template(
    'chatglm2', system='{system}\n\n', instruction='[Round {round}]\n\n问：{input}\n\n答：',
    suffix='', separator='\n\n', stop_words=(), bos=False, prefix='[gMASK]sop', end_history_turns=False,
    notes='chatglm2-6b build_prompt: [gMASK]sop, then [Round n] 问/答 blocks; no system slot (preamble)'))
_add(Template(
    'chatglm3', system='<|system|>\n{system}', instruction='<|user|>\n{input}<|assistant|>\n',
    suffix='', separator='', stop_words=('<|user|>', '<|observation|>'), bos=False, prefix='[gMASK]sop',
    end_history_turns=False,
    notes='chatglm3-6b build_chat_input: <|role|>\\n content blocks after [gMASK]sop; a turn ends at <|user|>'))
_add(Template(
    'glm4_chat', system='<|system|>\n{system}', instruction='<|user|>\n{input}<|assistant|>\n',
    suffix='', separator='', stop_words=('<|user|>', '<|observation|>', '<|endoftext|>'), bos=False,
    prefix='[gMASK]<sop>', end_history_turns=False,
    notes='glm-4-9b-chat: <|role|>\\n content blocks after [gMASK]<sop>; a turn ends at <|user|>'))
qwen_chat = _add(Template(
    'qwen_chat', system=_CHATML_SYS, instruction=_CHATML_INST,
    suffix='<|im_end|>', separator='\n', stop_words=('<|im_end|>', '<|endoftext|>'),
    default_system='You are a helpful assistant.', bos=False,
    notes='Qwen/Qwen1.5/Qwen2 chat: ChatML with no bos and the default system "You are a helpful assistant."'))
_alias('chatml', dataclasses.replace(qwen_chat, default_system=''),
       'plain ChatML (<|im_start|>role\\n...<|im_end|>), no bos, no default system; fits Qwen3 without <think>')
_alias('qwen3', dataclasses.replace(qwen_chat, default_system='', last_answer_prefix='<think>\n\n</think>\n\n'),
       'Qwen3 (0.6B-32B) chat_template in non-thinking mode: ChatML, no bos, no default system; the last answer '
       'opens with an empty <think></think> block, as the template writes with enable_thinking=False')
_alias('yi_chat', dataclasses.replace(qwen_chat, default_system=''),
       '01-ai Yi chat models: ChatML with no bos and no default system')
_add(Template(
    'baichuan_chat', system='{system}', instruction='<reserved_102>{input}<reserved_103>',
    suffix='', separator='', stop_words=(), bos=False,
    notes='Baichuan-13B-Chat _build_chat_input: system text, then user_token(195)/assistant_token(196) turns'))
_add(Template(
    'baichuan2_chat', system='{system}', instruction='<reserved_106>{input}<reserved_107>',
    suffix='', separator='', stop_words=(), bos=False,
    notes='Baichuan2-Chat build_chat_input: system text, then user_token(195)/assistant_token(196) turns'))
vicuna = _add(Template(
    'vicuna', system='{system} ', instruction='USER: {input} ASSISTANT:',
    suffix='', separator='', stop_words=(), default_system=_VICUNA_SYS,
    notes="FastChat vicuna_v1.1: '{system} USER: u ASSISTANT: a</s>USER: ...' with Vicuna's default system"))
_alias('wizardlm', vicuna, 'WizardLM-13B/70B-V1.2: the Vicuna v1.1 format and default system')
_add(Template(
    'llama3_chat', system='<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>',
    instruction=('<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>'
                 '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    suffix='<|eot_id|>', separator='', stop_words=('<|eot_id|>', '<|end_of_text|>'),
    notes='Meta-Llama-3(-8B)-Instruct chat_template: header blocks closed by <|eot_id|> after <|begin_of_text|>'))
mistral = _add(Template(
    'mistral', system='{system}\n\n', instruction='[INST] {input} [/INST]',
    suffix='', separator='', stop_words=(), system_in_instruction=True,
    notes='Mistral-7B-Instruct chat_template: <s>[INST] system\\n\\nu [/INST]a</s>[INST] ...; system in the first [INST]'))
_alias('mixtral', mistral, 'Mixtral-8x7B-Instruct-v0.1 chat_template: same as mistral')
mistral_v3 = _add(dataclasses.replace(
    mistral, name='mistral_v3', instruction='[INST] {input}[/INST]',
    notes=('Mistral-7B-Instruct-v0.3 chat_template: <s>[INST] u[/INST] a</s>[INST] ...; the published one puts '
           'the system text in the last [INST] (shown only when the prompt ends in a user turn), tunelab in the first')))
_add(dataclasses.replace(
    mistral_v3, name='mistral_tekken', instruction='[INST]{input}[/INST]',
    notes=('Mistral-Nemo-Instruct-2407 / Ministral-8B-Instruct-2410 (tekken tokenizer) chat_template: '
           '<s>[INST]u[/INST]a</s>, no spaces inside [INST]; the system text as in mistral_v3')))
_add(Template(
    'gemma', system='<start_of_turn>system\n{system}<end_of_turn>\n',
    instruction='<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n',
    suffix='<end_of_turn>', separator='\n', stop_words=('<end_of_turn>',),
    notes="gemma(-2)-it chat_template after <bos>; the system turn is XTuner's extension (gemma has none)"))
_add(Template(
    'gemma3', system='{system}\n\n', instruction='<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n',
    suffix='<end_of_turn>', separator='\n', stop_words=('<end_of_turn>',), system_in_instruction=True,
    notes='gemma-3-*-it chat_template after <bos>: gemma turns; the system text opens the first user turn, then a blank line'))
_add(Template(
    'phi3_chat', system='<|system|>\n{system}<|end|>\n', instruction='<|user|>\n{input}<|end|>\n<|assistant|>\n',
    suffix='<|end|>', separator='\n', stop_words=('<|end|>', '<|endoftext|>'),
    notes='Phi-3-mini-instruct chat_template: <s><|role|>\\n...<|end|>\\n blocks'))
_add(Template(
    'phi4', system='<|im_start|>system<|im_sep|>{system}<|im_end|>',
    instruction='<|im_start|>user<|im_sep|>{input}<|im_end|><|im_start|>assistant<|im_sep|>',
    suffix='<|im_end|>', separator='', stop_words=('<|im_end|>', '<|endoftext|>'), bos=False,
    notes='microsoft/phi-4 chat_template: <|im_start|>role<|im_sep|>...<|im_end|> blocks, no newlines, no bos'))
_add(Template(
    'phi4_mini', system='<|system|>{system}<|end|>', instruction='<|user|>{input}<|end|><|assistant|>',
    suffix='<|end|>', separator='', stop_words=('<|end|>', '<|endoftext|>'), bos=False,
    notes='Phi-4-mini-instruct chat_template: <|role|>...<|end|> blocks, no newlines, no bos'))
deepseek = _add(Template(
    'deepseek', system='{system}\n\n', instruction='User: {input}\n\nAssistant:',
    suffix='', separator='', stop_words=(),
    notes="deepseek-llm/deepseek-moe/DeepSeek-V2 chat: 'User: u\\n\\nAssistant: a<eos>' after the bos token"))
_alias('deepseek_v2', deepseek, 'DeepSeek-V2(-Lite)-Chat chat_template: same as deepseek')
_add(Template(
    'deepseek_coder', system='{system}', instruction='### Instruction:\n{input}\n### Response:\n',
    suffix='\n<|EOT|>', separator='\n', stop_words=('<|EOT|>',), default_system=_DEEPSEEK_CODER_SYS,
    notes=('deepseek-coder-*-instruct chat_template: system text (the default ends in "\\n", a given one is '
           'written as is), ### Instruction/### Response, answers end "\\n<|EOT|>"')))
_add(Template(
    'cohere', system='<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>',
    instruction=('<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>'
                 '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'),
    suffix='<|END_OF_TURN_TOKEN|>', separator='', stop_words=('<|END_OF_TURN_TOKEN|>',),
    notes='CohereForAI c4ai-command-r(-plus) chat_template after <BOS_TOKEN>'))
_add(Template(
    'minicpm', system='{system}', instruction='<用户>{input}<AI>',
    suffix='', separator='', stop_words=(),
    notes='MiniCPM-2B-sft/dpo chat_template: <s>{system}<用户>u<AI>a...; eos ends each answer'))


class UnknownTemplateError(ValueError):
    """A prompt template name that is neither in TEMPLATES nor 'auto'."""


def template_names() -> list[str]:
    """All valid template names: the TEMPLATES names sorted, then 'auto' (the tokenizer's chat_template)."""
    return sorted(TEMPLATES) + ['auto']


def get_template(name: str) -> Template:
    """The Template called `name`. 'auto' is not a Template: callers resolve it to the tokenizer's own
    chat_template before calling this."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        pass
    valid = ', '.join(template_names())
    if name == 'auto':
        raise UnknownTemplateError(f"prompt template 'auto' means the tokenizer's own chat_template and has "
                                   f"no Template; resolve it before get_template; valid names: {valid}")
    raise UnknownTemplateError(f'unknown prompt template {name!r}; valid names: {valid}')


# -- Hugging Face chat_template export ---------------------------------------------------------------

def _jinja_concat(fmt: str, fields: dict[str, str]) -> str:
    """A Jinja expression concatenating the literal parts of format string `fmt` (as string literals)
    and its {field}s (as the Jinja expressions in `fields`)."""
    parts, text = [], ''
    for literal, field, spec, conversion in string.Formatter().parse(fmt):
        text += literal
        if field is not None:
            if field not in fields or spec or conversion:
                raise ValueError(f'unsupported placeholder {{{field}}} in template text {fmt!r}')
            if text:
                parts.append(json.dumps(text, ensure_ascii=False))  # JSON strings are valid Jinja literals
            parts.append(fields[field])
            text = ''
    if text or not parts:
        parts.append(json.dumps(text, ensure_ascii=False))
    return ' ~ '.join(parts)


def template_to_jinja(t: Template) -> str:
    """A Hugging Face `chat_template` rendering `messages` (an optional first system message, then
    user/assistant turns) exactly as the Template lays them out. A user message renders the whole
    instruction, which already ends with the assistant header, so a conversation ending in a user
    message always ends with the generation prompt, with or without `add_generation_prompt`."""
    lit = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731
    end = lit(t.suffix) if t.suffix else 'eos_token'
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- set system_text = messages[0]['content'] or " + lit(t.default_system) + " -%}",
        "{%- else -%}",
        "{%- set loop_messages = messages -%}",
        "{%- set system_text = " + lit(t.default_system) + " -%}",
        "{%- endif -%}",
    ]
    if t.bos:
        lines.append("{{- bos_token -}}")
    if t.prefix:
        lines.append("{{- " + lit(t.prefix) + " -}}")
    system_block = _jinja_concat(t.system, {'system': 'system_text'}) if t.system else None
    if system_block and not t.system_in_instruction:
        lines.append("{%- if system_text -%}{{- " + system_block + " -}}{%- endif -%}")
    lines += [
        "{#- add_generation_prompt needs nothing: a user turn already ends with the assistant header -#}",
        "{%- set ns = namespace(round=0, users=(loop_messages | selectattr('role', 'equalto', 'user') | list "
        "| length)) -%}",
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set ns.round = ns.round + 1 -%}",
        "{%- set user_text = message['content'] -%}",
    ]
    if system_block and t.system_in_instruction:
        lines.append("{%- if ns.round == 1 and system_text -%}{%- set user_text = " + system_block +
                     " ~ user_text -%}{%- endif -%}")
    if t.separator:
        lines.append("{%- if ns.round > 1 -%}{{- " + lit(t.separator) + " -}}{%- endif -%}")
    end_answer = ("{{- " + end + " -}}" if t.end_history_turns
                  else "{%- if loop.last -%}{{- " + end + " -}}{%- endif -%}")
    lines += [
        "{{- " + _jinja_concat(t.instruction, {'input': 'user_text', 'round': 'ns.round'}) + " -}}",
    ]
    if t.last_answer_prefix:
        lines.append("{%- if ns.round == ns.users -%}{{- " + lit(t.last_answer_prefix) + " -}}{%- endif -%}")
    lines += [
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- message['content'] -}}" + end_answer,
        "{%- else -%}",
        "{{- raise_exception('Only an optional first system message, then user and assistant "
        "messages, are supported') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return '\n'.join(lines)
