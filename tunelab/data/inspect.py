"""`tunelab check-custom-dataset` and `tunelab log-dataset`: look at the data exactly as training will see it.

Both read the data with `load_dialogues` (same formats, same errors, same skip_bad_records semantics as
training), tokenise with the config's model tokenizer and render with `PromptFormat`, so what they show is
token for token what the training loop gets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tunelab.config.schema import Config
from tunelab.data.dataset import DataStats, build_sequences, encode_sample, load_dialogues
from tunelab.data.encode import IGNORE, PromptFormat

MASK = "[...]"  # stands for one run of consecutive untrained tokens in masked_text
SHOW = ("text", "masked_text", "input_ids", "labels", "all")


@dataclass
class _Tally:
    """Sample-level counts for one file (or the total)."""
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    empty_outputs: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, other: "_Tally") -> None:
        self.samples += other.samples
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.empty_outputs += other.empty_outputs
        self.lengths += other.lengths

    def lines(self, max_length: int) -> list[str]:
        n = len(self.lengths)
        tokens = (f"min {min(self.lengths)}, mean {sum(self.lengths) / n:.1f}, max {max(self.lengths)}"
                  if n else "none")
        return [f"samples: {self.samples} kept, {self.truncated} truncated (longer than max_length={max_length}), "
                f"{self.dropped} dropped (no answer token within max_length), {self.empty_outputs} empty outputs "
                f"(turns with nothing to train)",
                f"tokens per sample (before truncation): {tokens}"]


def check_dataset(cfg: Config, tokenizer_for: Callable[[Config], Any]) -> str:
    """Validate every record of cfg.data_path and return a report: per file the format and record counts,
    samples, truncated and dropped samples, empty outputs and token lengths; then totals and the packed
    sequence count. A bad record raises DataError as in training unless skip_bad_records is on, in which
    case it is counted (and the first few are listed). `tokenizer_for(cfg)` loads the model's tokenizer (the model
    layer's), once the data has been read, so a data error is reported before a model error."""
    stats = DataStats()
    dialogues = load_dialogues(cfg, stats)
    tokenizer = tokenizer_for(cfg)
    fmt = PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM)
    out = [f"check-custom-dataset: prompt_template {cfg.prompt_template}, max_length {cfg.max_length}, "
           f"skip_bad_records {cfg.skip_bad_records}"]
    total, rest = _Tally(), iter(dialogues)
    for file, fs in stats.files.items():  # load_dialogues returns the dialogues file by file, in this order
        tally = _Tally()
        for _ in range(fs.usable):
            _, turns = next(rest)
            full_length = len(fmt.encode(turns)[0])
            seq, truncated = encode_sample(fmt, turns, cfg.max_length)
            tally.lengths.append(full_length)
            tally.truncated += truncated
            tally.empty_outputs += sum(not t.trained for t in turns)
            if seq.n_targets == 0:  # training drops it: its answer lies wholly beyond max_length
                tally.dropped += 1
            else:
                tally.samples += 1
        total.add(tally)
        out.append(f"{file}: format {fs.format}, {fs.records} records ({fs.usable} usable, {fs.skipped} bad and "
                   f"skipped, {fs.filtered} filtered out)")
        out += ["  " + line for line in tally.lines(cfg.max_length)]
    # the packed count comes from the training code itself, so it cannot drift from what training does
    sequences, built = build_sequences(cfg, tokenizer)
    out.append(f"total: {stats.records} records in {len(stats.files)} file(s); {len(dialogues)} usable, "
               f"{stats.skipped} bad and skipped, {stats.filtered} filtered out")
    out += total.lines(cfg.max_length)
    out.append(f"packed sequences: {built.sequences}" + (f" of at most {cfg.max_length} tokens"
               if cfg.pack_to_max_length else " (pack_to_max_length is off: one sample each)"))
    if stats.problems:
        out.append(f"skipped or filtered records (first {min(5, len(stats.problems))} of {len(stats.problems)}):")
        out += ["  " + p for p in stats.problems[:5]]
    return "\n".join(out)


def masked_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The trained tokens decoded as they are, each run of untrained tokens replaced by one `[...]`.

    So `[...]Hello!<eoa>[...]Bye.<eoa>` means: everything up to the first answer is prompt (not trained),
    then `Hello!<eoa>` is trained, and so on."""
    parts, run, trained = [], [], None
    for token, label in zip(ids, labels):
        is_trained = label != IGNORE
        if run and is_trained != trained:
            parts.append(tokenizer.decode(run) if trained else MASK)
            run = []
        run.append(token)
        trained = is_trained
    if run:
        parts.append(tokenizer.decode(run) if trained else MASK)
    return "".join(parts)


def show_first_sample(cfg: Config, show: str, tokenizer_for: Callable[[Config], Any]) -> str:
    """The first sample of the data as the model gets it (after truncation to max_length), preceded by the
    format chosen for its file. show: text (decoded input_ids), masked_text (see `masked_text`), input_ids,
    labels (aligned with input_ids, -100 where nothing is trained; the loop shifts them itself), or all."""
    if show not in SHOW:
        raise ValueError(f"show must be one of {', '.join(SHOW)}")
    stats = DataStats()
    dialogues = load_dialogues(cfg, stats)
    where, turns = dialogues[0]
    tokenizer = tokenizer_for(cfg)
    seq, truncated = encode_sample(PromptFormat(tokenizer, cfg.prompt_template, cfg.SYSTEM), turns, cfg.max_length)
    ids = seq.input_ids
    labels = [IGNORE] + seq.targets[:-1]  # targets[t] is the label of token t+1
    file = next(f for f in stats.files if where.startswith(f"{f}: "))
    note = (f"truncated to max_length={cfg.max_length}" if truncated else "not truncated")
    if seq.n_targets == 0:
        note += "; no answer token within max_length, so training drops this sample"
    out = [f"first sample: {where} (format {stats.files[file].format}, {len(ids)} tokens, {note})"]
    sections = {
        "text": lambda: tokenizer.decode(ids),
        "masked_text": lambda: masked_text(tokenizer, ids, labels),
        "input_ids": lambda: str(ids),
        "labels": lambda: str(labels),
    }
    titles = {"masked_text": f"masked_text (trained text as is; {MASK} = untrained tokens)",
              "labels": "labels (-100 = not trained)"}
    for name in (sections if show == "all" else (show,)):
        out += [f"--- {titles.get(name, name)} ---", sections[name]()]
    return "\n".join(out)
