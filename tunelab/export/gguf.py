"""`tunelab convert gguf`: a model (merged, or a base with an adapter merged on the fly) as one GGUF file for
llama.cpp and Ollama, written with llama.cpp's own `gguf` package.

Names and metadata follow llama.cpp's converter: tensor names come from gguf's TensorNameMap; Llama's q/k rows
are reordered to llama.cpp's rotary layout; the tokenizer goes into tokenizer.ggml.* keys (byte-level BPE as
'gpt2' with its pre-tokenizer's name, SentencePiece-style BPE as 'llama' with scores); the chat template is the
one the model was trained with, and its end-of-turn marker is the eot token, which llama.cpp and Ollama stop at.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.fsutil import temp_dir_beside

log = logging.getLogger("tunelab")

# model_type -> (llama.cpp architecture, whether q/k rows move to llama.cpp's interleaved rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}
# what the gguf package writes itself; other types (q4_k_m, q6_k, ...) go through llama.cpp's quantiser
WRITTEN = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
OUTTYPES_HELP = ("f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (written directly), or a type of llama.cpp's "
                 "quantiser such as q4_k_m, q5_k_m, q6_k (needs llama-quantize on PATH or llama-cpp-python)")


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("convert gguf needs llama.cpp's gguf package: pip install 'tunelab[gguf]'") from None
    return gguf


def file_type(gguf, outtype: str):
    """The llama.cpp file type named by --outtype (f16 -> MOSTLY_F16, q4_k_m -> MOSTLY_Q4_K_M)."""
    name = "ALL_F32" if outtype == "f32" else "MOSTLY_" + outtype.upper()
    if not outtype.islower() or not hasattr(gguf.LlamaFileType, name):
        raise UserError(f"--outtype '{outtype}': not a GGUF type; use {OUTTYPES_HELP}")
    return getattr(gguf.LlamaFileType, name)


def to_gguf(model: str, out: str, adapter: str | None = None, outtype: str = "f16",
            trust_remote_code: bool = False) -> dict:
    """Write OUT.gguf (whole or not at all); returns what the Modelfile needs: template, system, stop words."""
    gguf = import_gguf()
    out_path = Path(out)
    ftype = file_type(gguf, outtype)
    quantiser = None if outtype in WRITTEN else find_quantiser(outtype)  # before any loading
    if out_path.is_dir():
        raise UserError(f"{out}: is a folder; give the .gguf file to write")
    hf_model, tokenizer, meta = _load(model, adapter, trust_remote_code)
    arch, permute = architecture(hf_model.config)
    template, system, jinja = chat_template(meta, tokenizer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = temp_dir_beside(out_path)
    try:
        tokenizer.chat_template = jinja
        tokenizer.save_pretrained(work / "tokenizer")
        direct = gguf.LlamaFileType.MOSTLY_F16 if quantiser else ftype
        writer = gguf.GGUFWriter(path=None, arch=arch)
        _write_config(writer, gguf, hf_model.config, out_path.stem, direct)
        _write_vocab(writer, gguf, work / "tokenizer", tokenizer, hf_model.config.vocab_size, template)
        _write_tensors(writer, gguf, hf_model, arch, permute, direct)
        written = work / "model.gguf"
        writer.write_header_to_file(path=written)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if quantiser:
            quantiser(written, work / "quantised.gguf", ftype)
            written = work / "quantised.gguf"
        os.replace(written, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"template": template, "system": system, "eos_token": tokenizer.eos_token or ""}


def _load(model: str, adapter: str | None, trust_remote_code: bool):
    """(model, tokenizer, tunelab.json); an adapter folder as MODEL means that adapter on its base. The
    architecture is checked before any weight loads."""
    from transformers import AutoConfig

    from tunelab.export.convert import load_merged
    from tunelab.model.load import load_model, load_tokenizer, read_metadata, resolve_model_path

    path = resolve_model_path(model, "MODEL")
    if adapter is None and (Path(path) / "adapter_config.json").is_file():
        adapter = path
        path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    architecture(AutoConfig.from_pretrained(resolve_model_path(path, "MODEL"), trust_remote_code=trust_remote_code))
    if adapter is not None:
        merged, tokenizer, meta, _, _ = load_merged(path, adapter, "cpu", trust_remote_code)
        return merged, tokenizer, meta
    hf_model = load_model(path, dtype="auto", device="cpu", trust_remote_code=trust_remote_code)
    return hf_model, load_tokenizer(path, trust_remote_code), read_metadata(path)


def architecture(config) -> tuple[str, bool]:
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"convert gguf: model type '{config.model_type}' is not supported yet (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[config.model_type]


def chat_template(meta: dict, tokenizer):
    """(Template or None, system text, Jinja chat template): the trained template, default system included."""
    import dataclasses

    from tunelab.config.templates import get_template, template_to_jinja

    name = meta.get("prompt_template")
    if not name or name == "auto":
        return None, meta.get("SYSTEM", ""), tokenizer.chat_template
    template = get_template(name)
    system = meta.get("SYSTEM") or template.default_system
    return template, system, template_to_jinja(dataclasses.replace(template, default_system=system))


def _write_config(writer, gguf, config, name: str, ftype) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind != "default":
        raise UserError(f"convert gguf: RoPE scaling '{kind}' is not written yet (default, linear and yarn are)")


def _write_tensors(writer, gguf, model, arch: str, permute: bool, ftype) -> None:
    config = model.config
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    qtype = _tensor_type(gguf, ftype)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"convert gguf: tensor '{hf_name}' has no llama.cpp name for '{arch}'")
        data = tensor.detach().to(torch.float32)
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _rotary_rows(data, config.num_attention_heads)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _rotary_rows(data, config.num_key_value_heads)
        array = data.numpy()
        # norms, biases and other 1-D tensors stay float32, as llama.cpp keeps them
        kind = gguf.GGMLQuantizationType.F32 if array.ndim <= 1 or name.endswith("_norm.weight") else qtype
        try:
            packed = gguf.quants.quantize(array, kind)
        except gguf.QuantError:  # rows not a multiple of the block size
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(array, kind)
        writer.add_tensor(name, packed, raw_dtype=kind)


def _tensor_type(gguf, ftype):
    by_file_type = {"ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16"}
    return getattr(gguf.GGMLQuantizationType, by_file_type.get(ftype.name, ftype.name.removeprefix("MOSTLY_")))


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotates the two halves of each head; llama.cpp's 'llama' rotates interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# -- tokenizer -------------------------------------------------------------------------------------------

def _write_vocab(writer, gguf, folder: Path, tokenizer, n_vocab: int, template) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"convert gguf: a '{model.get('type')}' tokenizer is not written yet (BPE ones are: "
                        f"byte-level as in GPT-2/Llama 3/Qwen, SentencePiece-style as in Llama 2/Mistral)")
    byte_level = not model.get("byte_fallback") and "ByteLevel" in json.dumps(spec.get("decoder"))
    tokens, types, scores = _tokens(gguf, tokenizer, n_vocab, byte_level)
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")) if byte_level else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not byte_level:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if template is not None:  # the training format decides whether a dialogue starts with bos
        special.add_special_token["bos"] = template.bos
    special.add_to_gguf(writer, quiet=True)
    end = end_of_turn_id(tokenizer, template)
    if end is not None:
        writer.add_eot_token_id(end)


def _tokens(gguf, tokenizer, n_vocab: int, byte_level: bool):
    """Token texts, types and scores for ids 0..n_vocab-1, as llama.cpp's converter lays them out."""
    import re

    T = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
            continue
        if i in added:
            kind = T.CONTROL if added[i].special or (text.startswith("<|") and text.endswith("|>")) else T.USER_DEFINED
            score = -1000.0
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind, score = T.BYTE, 0.0
        elif text == tokenizer.unk_token:
            kind, score = T.UNKNOWN, 0.0
        else:  # SentencePiece-style BPE ids follow merge order, which llama.cpp reads from the scores
            kind, score = T.NORMAL, -float(i)
        tokens.append(text)
        types.append(kind)
        scores.append(score)
    return tokens, types, scores


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level tokenizer's split rule (tokenizer.ggml.pre)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    splits = [p for p in (pre or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) == 1:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = splits[0].get("pattern", {}).get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex:
                return name
    log.warning("convert gguf: the tokenizer's pre-tokenizer is not one llama.cpp names; wrote 'default', "
                "which may split text differently from the original")
    return "default"


def end_of_turn_id(tokenizer, template) -> int | None:
    """The token that ends an answer in the trained format, when it is one token other than eos."""
    marker = (template.suffix.strip() if template and template.suffix else "")
    if not marker:
        return None
    ids = tokenizer.encode(marker, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.eos_token_id else None


# -- llama.cpp's quantiser -------------------------------------------------------------------------------

def find_quantiser(outtype: str):
    """A function (f16 file, out file, file type) running llama.cpp's quantiser: the llama-quantize program,
    else the library of llama-cpp-python; a UserError when neither is installed."""
    program = shutil.which("llama-quantize")
    if program:
        def run_program(source: Path, target: Path, ftype) -> None:
            done = subprocess.run([program, str(source), str(target), ftype.name.removeprefix("MOSTLY_")],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"llama-quantize failed for {outtype}: {done.stderr.strip().splitlines()[-1:]}")
        return run_program
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--outtype {outtype}: the gguf package writes {', '.join(WRITTEN)}; {outtype} needs "
                        f"llama.cpp's quantiser (llama-quantize on PATH, or pip install llama-cpp-python)") from None

    def run_library(source: Path, target: Path, ftype) -> None:
        import ctypes

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(ftype)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise UserError(f"llama.cpp's quantiser failed for {outtype}")
    return run_library
