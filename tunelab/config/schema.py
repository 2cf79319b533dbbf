"""The one config schema: every key a config file may set, its type, default, limits and meaning.

Validation, the comments that `copy-cfg` writes and `tunelab train --help` all read from here.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from tunelab.errors import ConfigError

REQUIRED = "<required>"


def setting(default: Any, help: str, *, group: str, min: float | None = None, gt: float | None = None,
            choices: tuple | None = None) -> Any:
    """Declare one config key: its default, a one-line help text, and its limits."""
    meta = {"help": help, "group": group, "min": min, "gt": gt, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


REPORT_TO = ("tensorboard", "wandb", "mlflow", "swanlab")  # the trackers tunelab.train.trackers starts
# The record formats tunelab.data.formats reads, in the order it tries them (its FORMATS, tests/test_layers.py)
DATASET_FORMATS = ("conversation", "openai", "msagent", "sharegpt", "glaive", "alpaca", "query_response", "oasst",
                   "guanaco", "text")
# The preference record formats of tunelab.data.preference (its FORMATS), for the dpo/orpo/simpo/kto objectives
PREFERENCE_FORMATS = ("kto", "sharegpt_pairs", "openai_pairs", "alpaca_pairs", "ultrafeedback", "trl_pairs")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")


@dataclass
class Config:
    """A tunelab run. Every field is a top-level name in a config file."""

    # --- model -----------------------------------------------------------------------------
    pretrained_model_name_or_path: str = setting(
        REQUIRED, "Base model: a local Hugging Face folder, a hub id (must be in the local cache when "
        "offline), or builtin:tiny-<arch> for a tiny random model built locally.", group="model")
    algorithm: Literal["full", "lora", "qlora"] = setting(
        "qlora", "full: train every weight; lora: train low-rank adapters on a frozen base; "
        "qlora: lora on a 4-bit NF4 (double-quantised) base.", group="model")
    trust_remote_code: bool = setting(
        False, "Allow the model folder's own Python code to run (needed by some families).", group="model")
    torch_dtype: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "Compute dtype: auto = bf16 on GPUs that support it, else fp32.", group="model")

    # --- data ------------------------------------------------------------------------------
    data_path: Union[str, list] = setting(
        REQUIRED, "Training data: a file (.json/.jsonl JSON array or JSON Lines, .csv, .parquet, .txt), a "
        "folder (its *train* files, else all data files; a datasets save_to_disk folder), a hub dataset id, a "
        "LLaMA-Factory dataset_info.json (with dataset), or a list of these; to mix, a list entry may be a dict "
        "{'path': ..., 'weight': 2.0 or 'count': 500, 'dataset_format', 'SYSTEM', 'dataset_columns', 'dataset'}.",
        group="data")
    dataset: str = setting(
        "", "With data_path at a LLaMA-Factory dataset_info.json (or its folder): the entry (or comma-separated "
        "entries) to train, e.g. 'glaive_toolcall_en_demo'; its file, formatting and columns are used.",
        group="data")
    dataset_format: str = setting(
        "auto", "Record format: auto (detected per file), " + ", ".join(DATASET_FORMATS) + "; with a preference "
        "objective, " + ", ".join(PREFERENCE_FORMATS) + ".", group="data")
    dataset_columns: dict = setting(
        {}, "Rename record fields before the format is detected, file column -> format field, e.g. "
        "{'prompt': 'query', 'completion': 'response'}; a renamed field replaces one of the same name. "
        "To map each data_path entry differently, key by the entry: {'a.json': {...}, 'org/ds': {...}}.",
        group="data")
    prompt_template: str = setting(
        "default", "Chat template the samples are rendered with (tunelab chat uses the same); "
        "'auto' uses the tokenizer's own chat_template.", group="data")
    prompt_template_check: bool = setting(
        True, "Stop before training when prompt_template writes markers the model's tokenizer does not know "
        "(another family's format, e.g. InternLM's <eoa> on a ChatML model); False keeps it on purpose.",
        group="data")
    SYSTEM: str = setting("", "System text put in every sample that has none.", group="data")
    max_length: int = setting(2048, "Tokens per sample; longer samples are truncated (counted and "
                              "reported).", group="data", min=1)
    pack_to_max_length: bool = setting(
        True, "Concatenate samples into max_length sequences; samples never attend to each other.",
        group="data")
    skip_bad_records: bool = setting(
        False, "Skip (and count) malformed records instead of stopping at the first.", group="data")
    shuffle: bool = setting(True, "Shuffle samples each epoch (seeded).", group="data")
    data_placeholders: dict = setting(
        {}, "Values for {{KEY}} placeholders in the data, e.g. {'NAME': 'Tuney', 'AUTHOR': 'Ada'} fills "
        "self-cognition records such as '我是{{NAME}}，由{{AUTHOR}}训练的'.", group="data")

    # --- optimisation ----------------------------------------------------------------------
    batch_size: int = setting(1, "Sequences per device per micro-batch.", group="train", min=1)
    accumulative_counts: int = setting(16, "Micro-batches accumulated per optimizer step.",
                                       group="train", min=1)
    max_epochs: int = setting(3, "Passes over the data.", group="train", min=1)
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: run max_epochs).",
                             group="train", min=0)
    optim_type: Literal["AdamW"] = setting("AdamW", "Optimizer (torch.optim.AdamW).", group="train")
    lr: float = setting(2e-4, "Peak learning rate.", group="train", gt=0)
    betas: list = setting([0.9, 0.999], "AdamW betas.", group="train")
    weight_decay: float = setting(0.0, "AdamW weight decay.", group="train", min=0)
    max_norm: float = setting(1.0, "Gradient clipping norm (0: no clipping).", group="train", min=0)
    warmup_ratio: float = setting(0.03, "Fraction of steps with linear warmup, then cosine decay.",
                                  group="train", min=0)
    gradient_checkpointing: bool = setting(True, "Recompute activations in backward to save memory.",
                                           group="train")
    fast_path: Literal["auto", "on", "off"] = setting(
        "auto", "Fused training forward (compiled layers, padding-free packed attention, chunked loss) over "
        "the same weights: auto = LoRA/QLoRA on a GPU for the families it is tested on (Llama, Qwen2/3, "
        "Mistral/Ministral, Phi-3/3.5/4, Gemma 1/2/3, InternLM 3; the log says why another model runs the plain "
        "path); on = the same families on a CPU and for full fine-tuning too; off = plain transformers.",
        group="train")
    checkpoint_layers: int = setting(
        -1, "With gradient_checkpointing on the fast path: recompute only the first N layers in backward "
        "(-1: all). Fewer is faster and uses more memory: each layer not recomputed keeps its activations.",
        group="train", min=-1)
    offload_checkpoints: Union[bool, Literal["auto"]] = setting(
        "auto", "With gradient_checkpointing on the fast path: keep each recomputed layer's input in pinned host "
        "memory instead of on the GPU (copied while the layer computes), as Unsloth's offloaded checkpointing "
        "does, and its attention output too, so that backward need not run attention forward again. Saves "
        "tokens x hidden_size x 2 bytes per recomputed layer but the top one (its copies would be the last out "
        "and the first back, so it keeps them). Where the link to the host has time to spare "
        "in forward, some layers also send their gate/up outputs, so that their recomputation skips those two "
        "GEMMs. With CUDA graphs, "
        "QLoRA's block scales are then also dequantised at each GEMM, as bitsandbytes does, instead of kept in "
        "fp32. auto: on a GPU, where the host buffers for the largest batch "
        "(about 3 x batch_size x max_length x hidden_size x 2 bytes per layer) take at most a quarter of the "
        "host memory available.", group="train")
    fast_compile: bool = setting(True, "torch.compile the fast path's layers (GPU only; compiles once, "
                                 "in the first steps).", group="train")
    cuda_graphs: bool = setting(True, "Replay each micro-batch of the fast path as a CUDA graph (captured once "
                                "per batch shape; cuts the CPU time of launching kernels). Used with "
                                "fast_compile, with LoRA and QLoRA.", group="train")
    seed: int = setting(0, "Random seed (data order, LoRA init, dropout).", group="train", min=0)

    # --- preference training ----------------------------------------------------------------
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = setting(
        "sft", "What the run optimises: sft (next-token loss on the answers); dpo, orpo, simpo (pairs of a chosen "
        "and a rejected answer to one prompt); kto (single answers labelled desirable or not; pairs count as one "
        "of each). The reference of dpo and kto is the base with the adapter off (lora, qlora) or the model as it "
        "starts (full), its log-probs computed once before training.", group="pref")
    pref_beta: float = setting(
        0.1, "beta of dpo, simpo and kto: how far the trained model may move from the reference (dpo, kto), the "
        "reward scale (simpo, whose paper uses 2 to 2.5).", group="pref", gt=0)
    pref_loss: Literal["sigmoid", "ipo", "hinge"] = setting(
        "sigmoid", "dpo's loss: sigmoid (the DPO paper), ipo (squared, over per-token averages), hinge (SLiC).",
        group="pref")
    pref_label_smoothing: float = setting(
        0.0, "dpo (sigmoid) and simpo: the assumed chance that a pair's preference is wrong (conservative DPO), "
        "below 0.5.", group="pref", min=0)
    simpo_gamma: float = setting(0.5, "simpo's target reward margin (gamma).", group="pref", min=0)
    orpo_lambda: float = setting(
        0.1, "orpo's weight of the odds-ratio term beside the chosen answers' next-token loss (lambda).",
        group="pref", gt=0)
    pref_ftx: float = setting(
        0.0, "dpo, simpo and kto: weight of the chosen (desirable) answers' next-token loss added to the objective "
        "(LLaMA-Factory's pref_ftx, TRL's rpo_alpha), which keeps their likelihood from falling while the "
        "rejected ones are pushed down; orpo always has it.", group="pref", min=0)
    kto_desirable_weight: float = setting(1.0, "kto's weight of the desirable answers' losses.", group="pref",
                                          gt=0)
    kto_undesirable_weight: float = setting(1.0, "kto's weight of the undesirable answers' losses.", group="pref",
                                            gt=0)

    # --- LoRA ------------------------------------------------------------------------------
    lora_r: int = setting(64, "LoRA rank.", group="lora", min=1)
    lora_alpha: float = setting(16, "LoRA scaling numerator (scale = alpha / r).", group="lora", gt=0)
    lora_dropout: float = setting(0.1, "Dropout on the LoRA input.", group="lora", min=0)
    lora_target_modules: Union[str, list] = setting(
        "all-linear", "Modules that get adapters: all-linear (every linear layer but the output head) "
        "or a list of names such as ['q_proj', 'v_proj'], each naming modules of the model (Phi-3 fuses them: "
        "qkv_proj, gate_up_proj).", group="lora")
    use_rslora: bool = setting(
        False, "Rank-stabilised LoRA: scale = lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r, so "
        "that high ranks keep learning.", group="lora")
    use_dora: bool = setting(
        False, "DoRA: a trained magnitude per output on top of the LoRA direction. Slower; trains on the "
        "plain path (the fast path computes plain LoRA).", group="lora")
    lora_init: str = setting(
        "default", "How adapters start: default (A random, B zero), gaussian (A normal), pissa (the top "
        "singular vectors of each weight, moved out of the base; pissa_niter_N: a fast SVD with N iterations), "
        "olora (QR of each weight, moved out of the base), both with algorithm 'lora'; loftq (algorithm "
        "'qlora': the adapter starts at the 4-bit base's rounding error, read from the base's .safetensors). "
        "Saved adapters always apply to the original base model.", group="lora")

    # --- evaluation, saving, logging -------------------------------------------------------
    evaluation_inputs: list = setting(
        [], "Prompts answered before training, every evaluation_freq steps and at the end (to the log).",
        group="eval")
    evaluation_data_path: Union[str, list] = setting(
        "", "Held-out data (same forms as data_path) whose loss is measured at each evaluation; '' for none.",
        group="eval")
    validation_split: float = setting(
        0.0, "Fraction of the training sequences held out for the validation loss when evaluation_data_path "
        "is empty (0: none).", group="eval", min=0)
    evaluation_freq: int = setting(500, "Optimizer steps between evaluations.", group="eval", min=1)
    evaluation_max_new_tokens: int = setting(64, "Tokens generated per evaluation answer.",
                                             group="eval", min=1)
    save_steps: int = setting(0, "Checkpoint every N optimizer steps (0: at the end of each epoch).",
                              group="save", min=0)
    save_total_limit: int = setting(-1, "Keep only the newest K checkpoints (-1: keep all).",
                                    group="save", min=-1)
    log_interval: int = setting(10, "Optimizer steps between log lines.", group="save", min=1)
    report_to: list = setting(
        ["tensorboard"], "Experiment trackers that get the run's config and the scalars of scalars.json: any of "
        + ", ".join(REPORT_TO) + " ([]: scalars.json only). Each is an optional package (pip install "
        "'tunelab[wandb]', ...) and reads its usual settings from the environment (WANDB_MODE, WANDB_PROJECT, "
        "MLFLOW_TRACKING_URI, SWANLAB_MODE); MLflow's default store is mlflow.db in the work dir.", group="save")
    auto_resume: bool = setting(
        False, "Continue from the newest checkpoint in the work dir when there is one (like --resume).",
        group="save")
    max_bad_steps: int = setting(
        5, "Stop after this many optimizer steps in a row with a non-finite loss or gradient (each is "
        "skipped).", group="save", min=1)

    @property
    def data_paths(self) -> list[str]:
        """The paths data_path names (a mixing entry's 'path')."""
        entries = self.data_path if isinstance(self.data_path, list) else [self.data_path]
        return [e["path"] if isinstance(e, dict) else e for e in entries]


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
GROUP_TITLES = {"model": "Model", "data": "Data", "train": "Optimisation", "pref": "Preference training",
                "lora": "LoRA", "eval": "Evaluation during training", "save": "Checkpoints and logs"}


def suggest(name: str, options) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    lowered = {o.lower(): o for o in options}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean '{lowered[hit[0]]}'?)" if hit else ""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is list:
        return isinstance(value, (list, tuple))
    if hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return {str: "a string", int: "an integer", float: "a number", bool: "True or False",
            list: "a list", dict: "a dict"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(key: str, value: Any, where: str) -> Any:
    """Validate one key's value against the schema; returns it (tuples become lists)."""
    if key not in FIELDS:
        raise ConfigError(f"{where}: unknown config key '{key}'{suggest(key, FIELDS)}")
    meta, hint = FIELDS[key].metadata, _HINTS[key]
    if not _type_ok(value, hint):
        raise ConfigError(f"{where}: '{key}' must be {_type_name(hint)}, got {value!r}")
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta["min"] is not None and value < meta["min"]:
            raise ConfigError(f"{where}: '{key}' must be >= {meta['min']}, got {value!r}")
        if meta["gt"] is not None and value <= meta["gt"]:
            raise ConfigError(f"{where}: '{key}' must be > {meta['gt']}, got {value!r}")
    return value


def build_config(values: dict[str, Any], where: str) -> Config:
    """Make a Config from a dict of settings, checking every key, type and limit."""
    for name, f in FIELDS.items():
        if f.default is REQUIRED and values.get(name) in (None, REQUIRED):
            raise ConfigError(f"{where}: '{name}' is required ({f.metadata['help']})")
    checked = {k: check_value(k, v, where) for k, v in values.items()}
    cfg = Config(**checked)
    if isinstance(cfg.data_path, list) and not cfg.data_path:
        raise ConfigError(f"{where}: 'data_path' is an empty list; give at least one file or folder")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"{where}: 'betas' must be two numbers in [0, 1), got {cfg.betas!r}")
    if cfg.warmup_ratio >= 1:
        raise ConfigError(f"{where}: 'warmup_ratio' must be < 1, got {cfg.warmup_ratio!r}")
    _check_sources(cfg, where)
    for key in ("evaluation_data_path", "evaluation_inputs", "lora_target_modules"):
        value = getattr(cfg, key)
        if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: '{key}' must hold non-empty strings only, got {value!r}")
    _check_columns(cfg, where)
    for tracker in cfg.report_to:
        if tracker not in REPORT_TO:
            raise ConfigError(f"{where}: 'report_to' may hold {', '.join(REPORT_TO)}, got {tracker!r}"
                              f"{suggest(str(tracker), REPORT_TO)}")
    if cfg.validation_split >= 1:
        raise ConfigError(f"{where}: 'validation_split' must be < 1, got {cfg.validation_split!r}")
    # copy-cfg writes every key, so only a non-default evaluation_freq counts as "set"
    if cfg.evaluation_freq != FIELDS["evaluation_freq"].default and not (cfg.evaluation_inputs or cfg.evaluation_data_path
                                            or cfg.validation_split):
        raise ConfigError(f"{where}: 'evaluation_freq' is set but there is nothing to evaluate; add "
                          f"evaluation_inputs, evaluation_data_path or validation_split (or drop evaluation_freq)")
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"{where}: 'lora_dropout' must be < 1, got {cfg.lora_dropout!r}")
    _check_adapter_variant(cfg, where)
    _check_preference(cfg, where)
    return cfg


def _check_preference(cfg: Config, where: str) -> None:
    if cfg.pref_label_smoothing >= 0.5:
        raise ConfigError(f"{where}: 'pref_label_smoothing' must be < 0.5, got {cfg.pref_label_smoothing!r}")
    if cfg.pref_label_smoothing and not (cfg.objective == "simpo" or (cfg.objective == "dpo"
                                                                      and cfg.pref_loss == "sigmoid")):
        raise ConfigError(f"{where}: 'pref_label_smoothing' applies to objective 'dpo' with pref_loss 'sigmoid' "
                          f"and to 'simpo'; drop it or change the objective")


LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora", "loftq")
_PISSA_NITER = re.compile(r"^pissa_niter_([1-9][0-9]*)$")


def _check_adapter_variant(cfg: Config, where: str) -> None:
    """lora_init's value, and the variants that need a given algorithm or exclude each other."""
    init = cfg.lora_init
    if (init not in LORA_INITS or init == "pissa_niter_<N>") and not _PISSA_NITER.match(init):
        raise ConfigError(f"{where}: 'lora_init' must be one of {', '.join(LORA_INITS)}, got {init!r}"
                          f"{suggest(init, LORA_INITS)}")
    variant = [f"{k} = {getattr(cfg, k)!r}" for k in ("use_rslora", "use_dora", "lora_init")
               if getattr(cfg, k) != FIELDS[k].default]
    if cfg.algorithm == "full" and variant:
        raise ConfigError(f"{where}: '{variant[0]}' sets up LoRA adapters, which algorithm 'full' does not train; "
                          f"use algorithm 'lora' or 'qlora', or drop it")
    moves_base = init.startswith("pissa") or init == "olora"
    if moves_base and cfg.algorithm == "qlora":
        # PEFT cannot run PiSSA on 4-bit weights; OLoRA would re-quantise the residual, so the saved adapter
        # (trained against that) would not give the same model on the original 4-bit base
        raise ConfigError(f"{where}: 'lora_init' {init!r} moves part of each weight out of the base, which a 4-bit "
                          f"base cannot hold exactly; use algorithm 'lora', or lora_init 'loftq' for QLoRA")
    if init == "loftq" and cfg.algorithm != "qlora":
        raise ConfigError(f"{where}: 'lora_init' 'loftq' starts the adapter at a 4-bit base's rounding error; "
                          f"it needs algorithm 'qlora', got {cfg.algorithm!r}")
    if init == "loftq" and cfg.use_dora:
        raise ConfigError(f"{where}: 'use_dora' with lora_init 'loftq' is not supported (DoRA's magnitudes are "
                          f"measured before LoftQ sets the adapter); use one of them")


SOURCE_KEYS = ("path", "weight", "count", "dataset_format", "SYSTEM", "dataset_columns", "dataset")


def _check_sources(cfg: Config, where: str) -> None:
    """data_path entries: non-empty strings, or mixing dicts (SOURCE_KEYS) with a path and at most one of a
    positive number weight or a positive integer count."""
    entries = cfg.data_path if isinstance(cfg.data_path, list) else [cfg.data_path]
    for i, entry in enumerate(entries):
        at = f"{where}: data_path[{i}]" if isinstance(cfg.data_path, list) else f"{where}: data_path"
        if isinstance(entry, str) and entry:
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be a path or a dict {{'path': ..., 'weight': ...}}, got {entry!r}")
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            raise ConfigError(f"{at}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), SOURCE_KEYS)}; a source "
                              f"takes {', '.join(SOURCE_KEYS)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{at}: needs 'path', the file, folder or hub id to read")
        weight, count = entry.get("weight"), entry.get("count")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise ConfigError(f"{at}: 'weight' must be a number above 0 (how many times its samples are taken: "
                              f"0.5 for half, 2 for twice), got {weight!r}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ConfigError(f"{at}: 'count' must be a whole number of samples, at least 1, got {count!r}")
        if weight is not None and count is not None:
            raise ConfigError(f"{at}: give 'weight' or 'count', not both")
        fmt = entry.get("dataset_format", "auto")
        if fmt != "auto" and fmt not in DATASET_FORMATS:
            raise ConfigError(f"{at}: 'dataset_format' must be auto or one of {', '.join(DATASET_FORMATS)}, "
                              f"got {fmt!r}")
        cols = entry.get("dataset_columns", {})
        if not isinstance(cols, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cols.items()):
            raise ConfigError(f"{at}: 'dataset_columns' must map column names to format fields, got {cols!r}")
        for key in ("SYSTEM", "dataset"):
            if not isinstance(entry.get(key, ""), str):
                raise ConfigError(f"{at}: '{key}' must be a string, got {entry[key]!r}")


def _columns_are_flat(cols: dict) -> bool:
    """One column mapping for every file (rather than one per data_path entry)."""
    return all(isinstance(v, str) for v in cols.values())


def _check_columns(cfg: Config, where: str) -> None:
    cols = cfg.dataset_columns
    if not cols:
        return
    flat = _columns_are_flat(cols)
    if not flat and not all(isinstance(v, dict) for v in cols.values()):
        raise ConfigError(f"{where}: 'dataset_columns' must map column -> field names, or data_path entry -> "
                          f"such a mapping, got {cols!r}")
    for mapping in [cols] if flat else cols.values():
        if not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in mapping.items()):
            raise ConfigError(f"{where}: 'dataset_columns' names must be non-empty strings, got {mapping!r}")
    if not flat:
        unknown = [k for k in cols if k not in cfg.data_paths]
        if unknown:
            raise ConfigError(f"{where}: 'dataset_columns' has an entry for {unknown[0]!r}, which is not in "
                              f"data_path ({', '.join(cfg.data_paths)})")


def columns_for(cfg: Config, data_path: str) -> dict[str, str]:
    """The column renaming (file column -> format field) that applies to one data_path entry."""
    cols = cfg.dataset_columns
    if cols and _columns_are_flat(cols):
        return cols
    return cols.get(data_path, {})


def default_value(key: str) -> Any:
    """The schema default of one key (a fresh copy for lists)."""
    f = FIELDS[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, in schema order."""
    return {name: getattr(cfg, name) for name in FIELDS}
