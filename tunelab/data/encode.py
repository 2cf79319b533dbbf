"""Dialogue -> token ids and labels. Training and chat both go through `PromptFormat.encode`, so the
prompt the model sees at chat time is token for token the one it was trained on."""
from __future__ import annotations

from tunelab.config.templates import Template, get_template
from tunelab.config.tool_styles import ToolStyle, parse_any, tool_style
from tunelab.data.turns import ToolCall, Turn
from tunelab.errors import DataError

IGNORE = -100


class PromptFormat:
    """Renders dialogues with a named template, or with the tokenizer's own chat template ('auto')."""

    def __init__(self, tokenizer, template_name: str, system: str = ""):
        self.tokenizer = tokenizer
        self.name = template_name
        self.system = system
        self.template: Template | None = None if template_name == "auto" else get_template(template_name)
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt_template 'auto': the tokenizer has no chat_template; "
                            "set prompt_template to a named template")

    # -- stop words -------------------------------------------------------------------------
    @property
    def stop_words(self) -> list[str]:
        """Strings that end an answer: the template's end-of-turn markers and the eos token."""
        words = list(self.template.stop_words) if self.template else [self._auto_end_of_turn()]
        eos = self.tokenizer.eos_token
        if eos and eos not in words:
            words.append(eos)
        return [w for w in words if w]

    def _auto_end_of_turn(self) -> str:
        marker = "\x00TUNELAB\x00"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return text.split(marker, 1)[1].strip()

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, turns: list[Turn], open_last: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE on prompts). With open_last the final turn's output is left
        out, giving the prompt a model continues at chat time."""
        if turns and turns[0].document:
            return self._encode_document(turns[0].output)
        segments = self._segments_template(turns) if self.template else self._segments_auto(turns)
        if open_last:
            segments = segments[:-1]
        ids: list[int] = []
        labels: list[int] = []
        if self.template and self.template.bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE)
        for text, trained, add_eos in segments:
            piece = self.tokenizer.encode(text, add_special_tokens=False) if text else []
            if add_eos:
                piece.append(self.tokenizer.eos_token_id)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels

    def _encode_document(self, text: str) -> tuple[list[int], list[int]]:
        """Pretraining text: the tokenizer's own special tokens (a bos where it adds one), the text, an eos;
        every token trained."""
        ids = self.tokenizer(text)["input_ids"]
        if self.tokenizer.eos_token_id is not None and (not ids or ids[-1] != self.tokenizer.eos_token_id):
            ids.append(self.tokenizer.eos_token_id)
        return ids, list(ids)

    # -- tools ------------------------------------------------------------------------------
    @property
    def tool_style(self) -> ToolStyle:
        return tool_style(self.name)

    def parse_reply(self, text: str) -> tuple[str, list[ToolCall]]:
        """A model's reply -> (answer text, tool calls), read in this template's tool format."""
        content, calls = (self.tool_style.parse(text) if self.template else parse_any(text))
        return content, [ToolCall(c["name"], c["arguments"]) for c in calls]

    def render(self, turns: list[Turn], open_last: bool = False) -> str:
        """The dialogue as text (what `encode` tokenises), for logs and tests."""
        ids, _ = self.encode(turns, open_last)
        return self.tokenizer.decode(ids)

    def text(self, turns: list[Turn], open_last: bool = False) -> str:
        """The dialogue as the template writes it, bos/eos tokens spelled out, before any tokenisation:
        what the template check compares with the tokenizer's own chat_template (open_last: as in encode)."""
        if self.template is None:
            raise ValueError("PromptFormat.text is for named templates; 'auto' is the tokenizer's own rendering")
        bos = self.tokenizer.bos_token if self.template.bos and self.tokenizer.bos_token else ""
        eos = self.tokenizer.eos_token or ""
        segments = self._segments_template(turns)
        if open_last:
            segments = segments[:-1]
        return bos + "".join(text + (eos if add_eos else "") for text, _, add_eos in segments)

    def _system_for(self, turns: list[Turn]) -> str:
        return turns[0].system or self.system or (self.template.default_system if self.template else "")

    def _segments_template(self, turns: list[Turn]) -> list[tuple[str, bool, bool]]:
        t = self.template
        tools = turns[0].tools if turns else []
        style = self.tool_style
        segments: list[tuple[str, bool, bool]] = []
        for i, turn in enumerate(turns):
            prompt = t.prefix if i == 0 else t.separator
            user_text = turn.input
            if i == 0:
                system = self._system_for(turns)
                if tools:
                    system = style.system(system, tools)
                if system and t.system:
                    block = t.system.replace("{system}", system)
                    if t.system_in_instruction:
                        user_text = block + user_text
                    else:
                        prompt += block
                if tools:
                    prompt += style.before_first(tools)
                    user_text = style.first_input(user_text, tools)
            if turn.results:  # the tools' answers to the previous turn's calls, in the format's own turn
                prompt += style.results(turn.results, t.instruction.replace("{round}", str(i + 1)))
            else:  # {round} first, so braces inside the user's text are never touched
                prompt += t.instruction.replace("{round}", str(i + 1)).replace("{input}", user_text)
            if i == len(turns) - 1:
                prompt += t.last_answer_prefix
            segments.append((prompt, False, False))
            output = style.output(turn.output, turn.calls) if turn.calls else turn.output
            has_output = bool(output)
            ends = t.end_history_turns or i == len(turns) - 1
            suffix = t.suffix if ends else ""
            segments.append((output + suffix, has_output, has_output and ends and not t.suffix))
        return segments

    def _segments_auto(self, turns: list[Turn]) -> list[tuple[str, bool, bool]]:
        """Split the tokenizer's rendering into prompt and answer parts by rendering prefixes."""
        tools = turns[0].tools or None

        def apply(msgs: list[dict], **kw) -> str:
            return self.tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, **kw)

        messages: list[dict] = []
        system = self._system_for(turns)
        if system:
            messages.append({"role": "system", "content": system})
        segments, done = [], ""
        for turn in turns:
            messages += ([{"role": "tool", "content": r.content, "name": r.name, "tool_call_id": r.call_id}
                          for r in turn.results] or [{"role": "user", "content": turn.input}])
            prompt = apply(messages, add_generation_prompt=True)
            answer: dict = {"role": "assistant", "content": turn.output}
            if turn.calls:
                answer["tool_calls"] = [{"id": c.id, "type": "function",
                                         "function": {"name": c.name, "arguments": c.arguments}}
                                        for c in turn.calls]
            messages.append(answer)
            full = apply(messages)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError("prompt_template 'auto': the tokenizer's chat_template does not render "
                                "conversations incrementally; set prompt_template to a named template")
            segments.append((prompt[len(done):], False, False))
            segments.append((full[len(prompt):], turn.trained, False))
            done = full
        return segments
