"""Text generation that stops at the template's end-of-turn markers and streams only the answer.

Used by `tunelab chat` and by the evaluation answers during training, so both behave the same."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 2048
    temperature: float = 0.1  # 0 = greedy
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # end-of-sequence tokens are suppressed until this many were generated


@dataclass
class Generated:
    """What one generation produced: the answer, how many tokens were generated, and why it ended
    ('stop': a stop word or end of sequence, 'length': max_new_tokens, 'cancelled': the caller asked)."""
    text: str
    tokens: int
    finish_reason: str
    stop_word: str | None = None  # the stop word that ended the text, if one did


def cut_at_stop(text: str, stop_words: list[str]) -> tuple[str, bool]:
    """Text before the first stop word, and whether one was found."""
    text, word = split_at_stop(text, stop_words)
    return text, word is not None


def split_at_stop(text: str, stop_words: list[str]) -> tuple[str, str | None]:
    """Text before the first stop word, and that stop word (None when there is none)."""
    hits = [(i, w) for w in stop_words if w and (i := text.find(w)) >= 0]
    if not hits:
        return text, None
    cut, word = min(hits, key=lambda h: (h[0], -len(h[1])))
    return text[:cut], word


def _held_back(text: str, stop_words: list[str]) -> int:
    """How many trailing characters might be the start of a stop word (so must not be shown yet)."""
    hold = 0
    for word in stop_words:
        for n in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:n]):
                hold = max(hold, n)
                break
    return hold


class _StopAndStream:
    """A transformers streamer + stopping criterion in one: decodes new tokens, emits text as it becomes
    safe to show, and signals a stop once a stop word appears."""

    def __init__(self, tokenizer, stop_words: list[str], on_text: Callable[[str], None] | None,
                 cancel: Callable[[], bool] | None = None):
        self.tokenizer, self.stop_words, self.on_text, self.cancel = tokenizer, stop_words, on_text, cancel
        self.prompt_seen, self.tokens, self.shown, self.stopped, self.cancelled = False, [], 0, False, False

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=False)

    # streamer protocol
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.text()
        visible, self.stopped = cut_at_stop(text, self.stop_words)
        if not self.stopped:
            visible = visible[: len(visible) - _held_back(visible, self.stop_words)]
            visible = visible.rstrip("\ufffd")  # half of a multi-byte character
        self._emit(visible)

    def end(self) -> None:
        self._emit(cut_at_stop(self.text(), self.stop_words)[0])

    def _emit(self, visible: str) -> None:
        if self.on_text and len(visible) > self.shown:
            self.on_text(visible[self.shown:])
        self.shown = max(self.shown, len(visible))

    # stopping-criteria protocol
    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.cancel is not None and not self.cancelled and self.cancel():  # checked once per token
            self.cancelled = True
        done = self.stopped or self.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate(model, tokenizer, input_ids: list[int], stop_words: list[str], sampling: Sampling,
             on_text: Callable[[str], None] | None = None) -> str:
    """The answer to a prompt (token ids), cut before the first stop word. on_text receives it piece by
    piece as it is generated."""
    return generate_full(model, tokenizer, input_ids, stop_words, sampling, on_text).text


@torch.no_grad()
def generate_full(model, tokenizer, input_ids: list[int], stop_words: list[str], sampling: Sampling,
                  on_text: Callable[[str], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> Generated:
    """Like `generate`, with the token count and finish reason; `cancel` is polled after every token and
    ends the generation early when it returns True (a server's client went away)."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    watcher = _StopAndStream(tokenizer, stop_words, on_text, cancel)
    eos_ids = [tokenizer.convert_tokens_to_ids(w) for w in stop_words]
    eos_ids = [i for i in eos_ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    greedy = sampling.temperature <= 0
    options = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                       repetition_penalty=sampling.repetition_penalty, eos_token_id=eos_ids or None,
                       pad_token_id=tokenizer.pad_token_id, streamer=watcher,
                       stopping_criteria=StoppingCriteriaList([watcher]), use_cache=True,
                       min_new_tokens=sampling.min_new_tokens or None, **options)
    finally:
        model.train(was_training)
    text, word = split_at_stop(watcher.text(), stop_words)
    if watcher.cancelled:
        reason = "cancelled"
    elif not watcher.stopped and len(watcher.tokens) >= sampling.max_new_tokens:
        reason = "length"
    else:
        reason = "stop"
    return Generated(text, len(watcher.tokens), reason, word)


def generate_until(model, tokenizer, input_ids: list[int], stop_words: list[str], sampling: Sampling,
                   on_text: Callable[[str], None] | None = None) -> tuple[str, str | None]:
    """Like `generate`, and also which stop word ended the text (None: eos or max_new_tokens)."""
    out = generate_full(model, tokenizer, input_ids, stop_words, sampling, on_text)
    return out.text, out.stop_word
