"""From `data_path` to training sequences: read, detect format, encode, truncate, pack, batch.

Packing puts whole samples side by side in one sequence. Each sample keeps its own position ids (restarting
at 0) and a segment id; the attention mask built from segment ids stops samples from seeing each other, and
targets are shifted inside each sample, so a packed sample's loss is exactly its loss alone.
"""
from __future__ import annotations

import bisect

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tunelab.config.schema import Config
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.formats import (PREPARE, BadRecord, Filtered, Turn, check_one_format, detect_format, looks_like,
                                  to_turns)
from tunelab.data.loading import Record, read_records
from tunelab.data.sources import FileSpec, Source, files_of, mix, retag, sources_of
from tunelab.errors import DataError

log = logging.getLogger("tunelab")


@dataclass
class Sequence:
    """One training row: token ids, next-token targets, per-sample position and segment ids. Preference rows
    (tunelab.data.preference) also say, per segment, what its answer is (`kinds`) and, once the reference
    model has read it, the answer's reference log-prob (`reference`)."""
    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    kinds: list[int] | None = None
    reference: list[float] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class FileStats:
    """What one data file gave: its format and what became of its records."""
    format: str
    records: int = 0
    usable: int = 0
    skipped: int = 0   # bad records passed over because skip_bad_records is on
    filtered: int = 0  # records the data marks as not for training (e.g. deleted OASST prompts)


@dataclass
class SourceStats:
    """What one data_path entry gave: its dialogues' range in load order and its samples after mixing."""
    source: Source
    start: int = 0
    end: int = 0
    samples: int = 0

    def line(self) -> str:
        rule = (f", weight {self.source.weight:g}" if self.source.weight is not None else
                f", count {self.source.count}" if self.source.count is not None else "")
        return f"{self.source.label}: {self.end - self.start} records -> {self.samples} samples{rule}"


@dataclass
class DataStats:
    records: int = 0
    samples: int = 0
    truncated: int = 0
    skipped: int = 0
    sequences: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    filtered: int = 0
    files: dict[str, FileStats] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # 'where: why' of skipped/filtered records, in order
    sources: list[SourceStats] = field(default_factory=list)

    def summary(self) -> str:
        fmts = ", ".join(f"{src} [{fmt}]" for src, fmt in self.formats.items())
        text = (f"data: {self.records} records -> {self.samples} samples -> {self.sequences} sequences; "
                f"{self.truncated} truncated, {self.skipped} skipped; formats: {fmts}")
        if len(self.sources) > 1 or any(s.source.weight or s.source.count for s in self.sources):
            text += "; sources: " + "; ".join(s.line() for s in self.sources)
        return text


def load_dialogues(cfg: Config, stats: DataStats) -> list[tuple[str, list[Turn]]]:
    """(where, turns) for every usable record of every file in cfg.data_path, file by file in order.

    Each file holds one format: cfg.dataset_format, or the one its first record is in (with
    skip_bad_records, its first recognisable record), and then a record of another format is an error.
    {{KEY}} placeholders are filled from cfg.data_placeholders. A file with no usable record is an error.
    """
    dialogues: list[tuple[str, list[Turn]]] = []
    for source in sources_of(cfg):
        start = len(dialogues)
        for spec in files_of(source):
            dialogues += _load_file(cfg, spec, stats)
        for _, turns in dialogues[start:]:  # the source's own system text, where a sample has none
            if source.system and not turns[0].system and not turns[0].document:
                turns[0].system = source.system
        stats.sources.append(SourceStats(source, start, len(dialogues), len(dialogues) - start))
    return dialogues


def mix_sources(dialogues: list, stats: DataStats, seed: int) -> list:
    """The dialogues with each source's weight or count applied (see sources.mix), sources in order."""
    out = []
    for src in stats.sources:
        taken = mix(dialogues[src.start:src.end], src.source, seed)
        src.samples = len(taken)
        out += taken
    return out


def rename_columns(records: list[Record], columns: dict[str, str]) -> list[Record]:
    """Records with fields renamed per `columns` (file column -> format field); a DataError when the
    first record lacks a mapped column, so a wrong mapping is caught before any training."""
    first = records[0].value
    if isinstance(first, dict):
        missing = [c for c in columns if c not in first]
        if missing:
            raise DataError(f"{records[0].where}: dataset_columns maps '{missing[0]}', but the record has no such "
                            f"field (fields: {', '.join(map(str, first))}); fix dataset_columns")
    out = []
    for rec in records:
        if isinstance(rec.value, dict):
            value = {k: v for k, v in rec.value.items() if k not in columns}
            value.update({dst: rec.value[src] for src, dst in columns.items() if src in rec.value})
            rec = Record(value, rec.source, rec.line)
        out.append(rec)
    return out


def _file_format(cfg: Config, records: list[Record], dataset_format: str) -> str:
    if dataset_format != "auto":
        return dataset_format  # the user said so: no detection, no mixed-format check
    first = records[0]
    if cfg.skip_bad_records:  # an unrecognisable first record is just one more bad record
        first = next((r for r in records if looks_like(r.value)), first)
    fmt = detect_format(first.value, first.where)
    check_one_format(records, fmt)
    return fmt


def _load_file(cfg: Config, spec: FileSpec, stats: DataStats) -> list[tuple[str, list[Turn]]]:
    file = spec.file
    records = read_records(file)
    if not records:
        raise DataError(f"{file}: holds no records; add records or remove the file from data_path")
    if spec.columns:
        records = rename_columns(records, spec.columns)
    if spec.tags:
        records = retag(records, spec.tags)
    fmt = _file_format(cfg, records, spec.dataset_format)
    if fmt in PREPARE:
        records = PREPARE[fmt](records)
    stats.formats[file] = fmt
    fstats = stats.files[file] = FileStats(fmt)
    out, first_problem = [], len(stats.problems)
    for rec in records:
        stats.records += 1
        fstats.records += 1
        try:
            turns = to_turns(rec.value, fmt)
            if not any(t.trained for t in turns):
                raise BadRecord("no trainable output (every output is empty)")
        except Filtered as exc:
            stats.filtered += 1
            fstats.filtered += 1
            stats.problems.append(f"{rec.where}: {exc}")
            continue
        except BadRecord as exc:
            skip_bad_record(cfg, stats, fstats, rec.where, exc)
            continue
        fill_placeholders(turns, cfg.data_placeholders, rec.where)
        out.append((rec.where, turns))
    if not out:
        raise DataError(f"{file}: no usable records ({fstats.skipped} bad and skipped, {fstats.filtered} filtered "
                        f"out; first: {stats.problems[first_problem]}); fix the records or remove the file "
                        f"from data_path")
    fstats.usable = len(out)
    return out


_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def skip_bad_record(cfg: Config, stats: DataStats, fstats: FileStats, where: str, exc: BadRecord) -> None:
    """A bad record stops the run with one line, or with skip_bad_records is counted and kept for the summary."""
    if not cfg.skip_bad_records:
        raise DataError(f"{where}: {exc}; fix the record or set skip_bad_records = True") from None
    stats.skipped += 1
    fstats.skipped += 1
    stats.problems.append(f"{where}: {exc}")


def fill_placeholders(turns: list[Turn], values: dict, where: str) -> None:
    """Replace {{KEY}} in every input, output and system text from `values` (config data_placeholders).

    Any key given is filled. An unfilled {{KEY}} in capitals (ms-swift's convention, e.g. {{NAME}}) is a
    DataError, even with skip_bad_records (the config, not the record, needs fixing); other unfilled
    {{...}} text is left alone, since code in the data (Vue, Handlebars) uses the same braces."""
    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key in values:
            return str(values[key])
        if key.isupper():
            raise DataError(f"{where}: placeholder {{{{{key}}}}} has no value; set data_placeholders = "
                            f"{{'{key}': ...}} in the config")
        return match.group(0)

    for turn in turns:
        for attr in ("system", "input", "output"):
            text = getattr(turn, attr)
            if "{{" in text:
                setattr(turn, attr, _PLACEHOLDER.sub(sub, text))


def encode_samples(fmt: PromptFormat, turns: list[Turn], max_length: int) -> tuple[list[Sequence], bool]:
    """encode_sample, except that pretraining text longer than max_length is cut into max_length pieces, each a
    sample of its own, rather than truncated: every token of a document is trained."""
    if not turns[0].document:
        seq, truncated = encode_sample(fmt, turns, max_length)
        return [seq], truncated
    ids, _ = fmt.encode(turns)
    pieces = []
    for at in range(0, len(ids), max_length):
        piece = ids[at:at + max_length]
        pieces.append(Sequence(piece, piece[1:] + [IGNORE], list(range(len(piece))), [0] * len(piece)))
    return pieces, False


def encode_sample(fmt: PromptFormat, turns: list[Turn], max_length: int) -> tuple[Sequence, bool]:
    """Encode one dialogue as a Sequence of at most max_length tokens; also says whether it was cut."""
    ids, labels = fmt.encode(turns)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    targets = labels[1:] + [IGNORE]  # position t predicts token t+1 of the same sample
    n = len(ids)
    return Sequence(ids, targets, list(range(n)), [0] * n), truncated


def build_sequences(cfg: Config, tokenizer, stats: DataStats | None = None) -> tuple[list[Sequence], DataStats]:
    """Everything the training loop needs from the data, with counts for the log."""
    stats = stats or DataStats()
    fmt = PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM)
    samples = []
    for where, turns in mix_sources(load_dialogues(cfg, stats), stats, cfg.seed):
        seqs, truncated = encode_samples(fmt, turns, cfg.max_length)
        stats.truncated += truncated
        for seq in seqs:
            if seq.n_targets == 0:  # the answer lies wholly beyond max_length
                stats.skipped += 1
                continue
            samples.append(seq)
    if not samples:
        raise DataError(f"data_path {cfg.data_path!r}: no sample has a trainable output within max_length="
                        f"{cfg.max_length}; raise max_length or check the data")
    stats.samples = len(samples)
    if cfg.pack_to_max_length:
        random.Random(cfg.seed).shuffle(samples)  # mix sources before packing, like XTuner
        samples = pack(samples, cfg.max_length)
    stats.sequences = len(samples)
    return samples, stats


def pack(samples: list[Sequence], max_length: int) -> list[Sequence]:
    """Whole samples concatenated into sequences of at most max_length tokens, best fit: in their given order,
    each sample goes into the fullest sequence it still fits in. Filling in order leaves each sequence short by
    about half a sample, all of it padding the step computes. Taken in the given (shuffled) order rather than longest first, sequences mix
    samples as the data does, not by length. A sequence holds its samples in their given order."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) ascending: the fullest row that fits comes first
    for i in range(len(samples)):
        at = bisect.bisect_left(free, (len(samples[i]), -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - len(samples[i]) > 0:
            bisect.insort(free, (room - len(samples[i]), row))
    return [join([samples[i] for i in members]) for members in rows]


def join(samples: list[Sequence]) -> Sequence:
    """Samples side by side in one sequence, each keeping its segments apart (a preference pair is two)."""
    out = Sequence([], [], [], [], [] if samples[0].kinds is not None else None,
                   [] if samples[0].reference is not None else None)
    for seq in samples:
        base = out.segment_ids[-1] + 1 if out.segment_ids else 0
        out.input_ids += seq.input_ids
        out.targets += seq.targets
        out.position_ids += seq.position_ids
        out.segment_ids += [base + s for s in seq.segment_ids]
        if out.kinds is not None:
            out.kinds += seq.kinds
        if out.reference is not None:
            out.reference += seq.reference
    return out


# What right-padding fills each batch field with (input_ids: the tokenizer's pad id): padding is never a target
# and is its own segment (-1), so it never mixes with real tokens. The fast path's graphs pad the same way.
PAD_VALUES = {"targets": IGNORE, "position_ids": 0, "segment_ids": -1}


def collate(batch: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors (see PAD_VALUES)."""
    width = max(len(s) for s in batch)
    fill = {"input_ids": pad_id, **PAD_VALUES}
    # through numpy: torch.tensor converts a list element by element, and on a GPU the step waits for this
    return {key: torch.from_numpy(np.array([row + [fill[key]] * (width - len(row))
                                            for row in (getattr(s, key) for s in batch)], dtype=np.int64))
            for key in ("input_ids", "targets", "position_ids", "segment_ids")}


def attention_bias(segment_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive 4-D mask (batch, 1, q, k): a token sees earlier tokens of its own segment only; with a sliding
    `window`, only the last `window` of them (itself included), as transformers' sliding_window_overlay."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    n = segment_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    allowed = (same & causal)[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def model_attention_mask(config, segment_ids: torch.Tensor, dtype: torch.dtype):
    """The mask a transformers model's own forward takes for packed rows. It takes a prepared 4-D mask as it is,
    without the sliding window it would have built itself, so the window goes in here: on every layer (Mistral)
    or, where the config names each layer's kind (layer_types), as one mask per kind. A text-and-image model
    (Gemma 3 from 4B on) keeps those fields in its text config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return attention_bias(segment_ids, dtype)
    kinds = set(getattr(config, "layer_types", None) or [])
    if not kinds:
        return attention_bias(segment_ids, dtype, window)
    masks = {"full_attention": attention_bias(segment_ids, dtype)}
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = attention_bias(segment_ids, dtype, window)
    return masks if len(masks) > 1 else masks["full_attention"]


def format_counts(stats: DataStats) -> str:
    return ", ".join(f"{k}: {v}" for k, v in Counter(stats.formats.values()).items())
