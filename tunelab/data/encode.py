"""Dialogue -> token ids and labels. Training and chat both go through `PromptFormat.encode`, so the
prompt the model sees at chat time is token for token the one it was trained on."""
from __future__ import annotations

from tunelab.data.formats import Turn
from tunelab.config.templates import Template, get_template
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
        segments: list[tuple[str, bool, bool]] = []
        for i, turn in enumerate(turns):
            prompt = t.prefix if i == 0 else t.separator
            user_text = turn.input
            if i == 0:
                system = self._system_for(turns)
                if system and t.system:
                    block = t.system.replace("{system}", system)
                    if t.system_in_instruction:
                        user_text = block + user_text
                    else:
                        prompt += block
            # {round} first, so braces inside the user's text are never touched
            prompt += t.instruction.replace("{round}", str(i + 1)).replace("{input}", user_text)
            if i == len(turns) - 1:
                prompt += t.last_answer_prefix
            segments.append((prompt, False, False))
            has_output = bool(turn.output)
            ends = t.end_history_turns or i == len(turns) - 1
            suffix = t.suffix if ends else ""
            segments.append((turn.output + suffix, has_output, has_output and ends and not t.suffix))
        return segments

    def _segments_auto(self, turns: list[Turn]) -> list[tuple[str, bool, bool]]:
        """Split the tokenizer's rendering into prompt and answer parts by rendering prefixes."""
        apply = self.tokenizer.apply_chat_template
        messages: list[dict] = []
        system = self._system_for(turns)
        if system:
            messages.append({"role": "system", "content": system})
        segments, done = [], ""
        for turn in turns:
            messages.append({"role": "user", "content": turn.input})
            prompt = apply(messages, tokenize=False, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": turn.output})
            full = apply(messages, tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError("prompt_template 'auto': the tokenizer's chat_template does not render "
                                "conversations incrementally; set prompt_template to a named template")
            segments.append((prompt[len(done):], False, False))
            segments.append((full[len(prompt):], bool(turn.output), False))
            done = full
        return segments
