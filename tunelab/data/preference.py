"""Preference data (objectives dpo, orpo, simpo, kto): read pairs and labelled answers, and encode them as rows.

A pair is one prompt with a chosen and a rejected answer; a KTO sample is one prompt with one answer labelled
desirable (true) or not. Records come as LLaMA-Factory writes them (alpaca or sharegpt/openai messages with
`chosen` and `rejected`; sharegpt with a `kto_tag`), as TRL writes them (`prompt`/`chosen`/`rejected` or
`prompt`/`completion`/`label`, as text or as messages, the prompt possibly implicit in the shared messages),
and in the UltraFeedback styles (binarized: chosen and rejected conversations; raw: scored `completions`). A file
holds one format, detected from its first record as for SFT.

Encoding: the prompt is rendered once and both answers continue the same prompt tokens; only the answer is a
target. A pair is one unit of two segments, chosen then rejected, and a KTO sample one of two, its answer then
a mismatched answer (the next sample's, after the same prompt) that estimates the KL term. Each segment is
cut to max_length // 2 tokens, so that a unit always fits one row; packing puts many units in a row, each
segment attending only to itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.config.schema import Config, columns_for
from tunelab.data.dataset import (DataStats, FileStats, Sequence, fill_placeholders, join, pack, rename_columns,
                                  skip_bad_record)
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.formats import Turn
from tunelab.data.loading import Record, read_records, resolve_data_files
from tunelab.data.tool_records import messages_to_turns, openai_messages
from tunelab.data.turns import BadRecord
from tunelab.errors import DataError

# What a segment holds (Sequence.kinds): the chosen (desirable) answer, the rejected (undesirable) one, or a KTO
# sample's mismatched answer, which only estimates the KL term
CHOSEN, REJECTED, MISMATCHED = 1, 0, 2


@dataclass
class Pair:
    """A prompt (turns whose last output is empty) with a chosen and a rejected answer."""
    prompt: list[Turn]
    chosen: str
    rejected: str


@dataclass
class Judged:
    """A prompt with one answer, labelled desirable or not (KTO)."""
    prompt: list[Turn]
    answer: str
    desirable: bool


_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _message_keys(messages: list) -> tuple[str, str, dict[str, str]]:
    """(role key, text key, roles) of a message list: openai's role/content or sharegpt's from/value."""
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    return ("from", "value", _SHAREGPT_ROLES) if "from" in first else ("role", "content", _OPENAI_ROLES)


def _prompt_of(messages: Any, system: str = "") -> list[Turn]:
    """Prompt turns from a message list that ends with the user's message."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("the prompt's message list is empty or not a list")
    role_key, text_key, roles = _message_keys(messages)
    last = messages[-1]
    if not isinstance(last, dict) or roles.get(str(last.get(role_key))) != "user":
        raise BadRecord("the prompt's messages must end with the user's message")
    turns = messages_to_turns(openai_messages(messages, role_key, text_key), [], open_last=True)
    if system and not turns[0].system:
        turns[0].system = system
    return turns


def _answer(value: Any, key: str) -> str:
    """An answer's text: a string, a message ({role, content} or {from, value}), or a list of messages whose
    last one is the answer."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string or an assistant message")
    if not value.strip():
        raise BadRecord(f"the '{key}' answer is empty")
    return value


def _pair(prompt: list[Turn], chosen: str, rejected: str) -> Pair:
    if chosen.strip() == rejected.strip():
        raise BadRecord("the chosen and rejected answers are identical, so the pair prefers nothing")
    return Pair(prompt, chosen, rejected)


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string")
    return value


def _alpaca_prompt(record: dict) -> list[Turn]:
    instruction, extra = _text(record, "instruction"), record.get("input") or ""
    turns = [Turn(str(q), str(a)) for q, a in record.get("history") or []]
    turns.append(Turn(f"{instruction}\n{extra}" if str(extra).strip() else instruction, ""))
    turns[0].system = str(record.get("system") or "")
    return turns


def _alpaca_pairs(record: dict) -> Pair:
    return _pair(_alpaca_prompt(record), _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected"))


def _messages_pairs(key: str) -> Callable[[dict], Pair]:
    def convert(record: dict) -> Pair:
        prompt = _prompt_of(record[key], str(record.get("system") or ""))
        return _pair(prompt, _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected"))
    return convert


def _shared_prompt(chosen: Any, rejected: Any) -> list[Turn]:
    """The prompt that two whole conversations share: every message but their last (the answers)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1):
        raise BadRecord("without a 'prompt', 'chosen' and 'rejected' must be whole conversations (message lists)")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("'chosen' and 'rejected' differ before their last message, so they share no prompt")
    return _prompt_of(chosen[:-1])


def _trl_pairs(record: dict) -> Pair:
    """TRL's explicit prompt (text or messages) or implicit one; also UltraFeedback binarized, whose chosen and
    rejected are whole conversations beside a text prompt."""
    prompt = record.get("prompt")
    if isinstance(record["chosen"], list) and len(record["chosen"]) > 1:
        turns = _shared_prompt(record["chosen"], record["rejected"])
    elif isinstance(prompt, str):
        turns = [Turn(prompt, "")]
    elif prompt is not None:
        turns = _prompt_of(prompt)
    else:
        raise BadRecord("missing 'prompt'")
    return _pair(turns, _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected"))


def _ultrafeedback(record: dict) -> Pair:
    """openbmb/UltraFeedback: the best and the worst of the scored `completions` (overall_score)."""
    scored = [c for c in record["completions"] if isinstance(c, dict) and isinstance(c.get("overall_score"),
                                                                                      (int, float))]
    if len(scored) < 2:
        raise BadRecord("fewer than two completions with an 'overall_score'")
    best = max(scored, key=lambda c: c["overall_score"])
    worst = min(scored, key=lambda c: c["overall_score"])
    if best["overall_score"] == worst["overall_score"]:
        raise BadRecord("every completion has the same overall_score, so the record prefers nothing")
    return _pair([Turn(_text(record, "instruction"), "")], _answer(best.get("response"), "chosen"),
                 _answer(worst.get("response"), "rejected"))


def _kto(record: dict) -> Judged:
    """TRL's prompt/completion/label, or LLaMA-Factory's conversation with a kto_tag."""
    if "completion" in record:
        label_key = "label"
        prompt = record.get("prompt")
        turns = [Turn(prompt, "")] if isinstance(prompt, str) else _prompt_of(prompt)
        answer = _answer(record["completion"], "completion")
    else:
        label_key = "kto_tag"
        messages = record.get("messages", record.get("conversations"))
        if not isinstance(messages, list) or len(messages) < 2:
            raise BadRecord("'messages' (or 'conversations') must hold the prompt and the answer")
        turns = _prompt_of(messages[:-1], str(record.get("system") or ""))
        answer = _answer(messages[-1], "answer")
    label = record.get(label_key)
    if label is None:
        raise BadRecord(f"missing '{label_key}' (true for a desirable answer, false for an undesirable one)")
    if not isinstance(label, bool):
        raise BadRecord(f"'{label_key}' must be true or false, got {label!r}")
    return Judged(turns, answer, label)


def _has(*keys: str) -> Callable[[Any], bool]:
    return lambda r: isinstance(r, dict) and all(k in r for k in keys)


# name -> (is this record of the format?, converter). Order matters: the first match wins.
FORMATS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Pair | Judged]]] = {
    "kto": (lambda r: _has("completion")(r) or _has("kto_tag")(r), _kto),
    "sharegpt_pairs": (_has("conversations", "chosen", "rejected"), _messages_pairs("conversations")),
    "openai_pairs": (_has("messages", "chosen", "rejected"), _messages_pairs("messages")),
    "alpaca_pairs": (_has("instruction", "chosen", "rejected"), _alpaca_pairs),
    "ultrafeedback": (_has("instruction", "completions"), _ultrafeedback),
    "trl_pairs": (_has("chosen", "rejected"), _trl_pairs),
}


def _detect(value: Any, where: str) -> str:
    name = next((n for n, (matches, _) in FORMATS.items() if matches(value)), None)
    if name is None:
        keys = ", ".join(sorted(map(str, value))) if isinstance(value, dict) else type(value).__name__
        raise DataError(f"{where}: not a preference record (keys: {keys}); a pair needs 'chosen' and 'rejected' "
                        f"answers (with 'prompt', 'instruction', 'conversations' or 'messages'), a KTO row "
                        f"'prompt', 'completion' and 'label'; see `tunelab train --help`: dataset_format")
    return name


def load_preferences(cfg: Config, stats: DataStats) -> list[tuple[str, Pair | Judged]]:
    """(where, pair or judged answer) for every usable record of every file in cfg.data_path, in order."""
    out: list[tuple[str, Pair | Judged]] = []
    for data_path in cfg.data_paths:
        columns = columns_for(cfg, data_path)
        for file in resolve_data_files(data_path):
            records = read_records(file)
            if not records:
                raise DataError(f"{file}: holds no records; add records or remove the file from data_path")
            out += _load_file(cfg, file, rename_columns(records, columns) if columns else records, stats)
    return out


def _load_file(cfg: Config, file: str, records: list[Record], stats: DataStats) -> list[tuple[str, Pair | Judged]]:
    fmt = cfg.dataset_format if cfg.dataset_format != "auto" else _detect(records[0].value, records[0].where)
    stats.formats[file] = fmt
    fstats = stats.files[file] = FileStats(fmt)
    out = []
    for rec in records:
        stats.records += 1
        fstats.records += 1
        try:
            other = next((n for n, (matches, _) in FORMATS.items() if matches(rec.value)), None)
            if cfg.dataset_format == "auto" and other is not None and other != fmt:
                raise DataError(f"{rec.where}: this record looks like {other} but the file's first record is "
                                f"{fmt}; split the file or set dataset_format")
            try:
                item = FORMATS[fmt][1](rec.value)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                if isinstance(exc, BadRecord):
                    raise
                raise BadRecord(f"does not fit the {fmt} format ({type(exc).__name__}: {exc})") from None
            if isinstance(item, Judged) and cfg.objective != "kto":
                raise DataError(f"{rec.where}: a KTO row (one answer with a label), but objective '{cfg.objective}' "
                                f"trains on pairs of a chosen and a rejected answer; use objective = 'kto' or pairs")
        except BadRecord as exc:
            skip_bad_record(cfg, stats, fstats, rec.where, exc)
            continue
        fill_placeholders(item.prompt, cfg.data_placeholders, rec.where)
        out.append((rec.where, item))
    if not out:
        raise DataError(f"{file}: no usable records ({fstats.skipped} bad and skipped; first: "
                        f"{stats.problems[-fstats.skipped]}); fix the records or remove the file from data_path")
    fstats.usable = len(out)
    return out


def encode_answer(fmt: PromptFormat, prompt: list[Turn], answer: str, limit: int) -> tuple[Sequence, bool]:
    """One segment: the prompt's tokens (not targets) then the answer's, cut to `limit` tokens; also says
    whether it was cut."""
    turns = [Turn(t.input, t.output, t.system) for t in prompt]
    turns[-1].output = answer
    ids, labels = fmt.encode(turns)
    n_prompt = len(fmt.encode(turns, open_last=True)[0])
    labels = [IGNORE] * n_prompt + labels[n_prompt:]  # earlier turns' answers are context, not targets
    truncated = len(ids) > limit
    ids, labels = ids[:limit], labels[:limit]
    return Sequence(ids, labels[1:] + [IGNORE], list(range(len(ids))), [0] * len(ids)), truncated


def _as_judged(items: list[Pair | Judged]) -> list[Judged]:
    """KTO's samples: a pair counts as a desirable and an undesirable answer to its prompt."""
    out = []
    for item in items:
        out += [Judged(item.prompt, item.chosen, True), Judged(item.prompt, item.rejected, False)] \
            if isinstance(item, Pair) else [item]
    return out


def encode_units(cfg: Config, fmt: PromptFormat, items: list[Pair | Judged],
                 stats: DataStats) -> list[Sequence]:
    """One unit of two segments per usable pair (chosen, rejected) or KTO sample (answer, mismatched answer)."""
    limit = max(1, cfg.max_length // 2)
    if cfg.objective == "kto":
        judged = _as_judged(items)
        answers = [(j.prompt, j.answer, CHOSEN if j.desirable else REJECTED) for j in judged]
        # each prompt with the next sample's answer: a completion the model was not asked for, for the KL term
        others = [(j.prompt, judged[(i + 1) % len(judged)].answer, MISMATCHED) for i, j in enumerate(judged)]
    else:
        answers = [(p.prompt, p.chosen, CHOSEN) for p in items]
        others = [(p.prompt, p.rejected, REJECTED) for p in items]
    units = []
    for first, second in zip(answers, others):
        parts = []
        for prompt, answer, kind in (first, second):
            seq, truncated = encode_answer(fmt, prompt, answer, limit)
            seq.kinds = [kind]
            stats.truncated += truncated
            parts.append(seq)
        if any(p.n_targets == 0 for p in parts):  # an answer lies wholly beyond max_length // 2
            stats.skipped += 1
            continue
        units.append(join(parts))
    return units


def build_units(cfg: Config, tokenizer, stats: DataStats | None = None) -> tuple[list[Sequence], DataStats]:
    """The preference counterpart of dataset.build_sequences: units (packed into rows when pack_to_max_length)."""
    stats = stats or DataStats()
    fmt = PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM)
    units = encode_units(cfg, fmt, [item for _, item in load_preferences(cfg, stats)], stats)
    if not units:
        raise DataError(f"data_path {cfg.data_path!r}: no pair or sample has an answer within max_length // 2 = "
                        f"{cfg.max_length // 2} tokens; raise max_length or check the data")
    stats.samples = len(units)
    if cfg.pack_to_max_length:
        random.Random(cfg.seed).shuffle(units)
        units = pack(units, cfg.max_length)
    stats.sequences = len(units)
    return units, stats
