"""Find and load models and tokenizers (local folders, cached hub ids, builtin:tiny-*), in full precision,
4-bit NF4 (double quantisation) or 8-bit, and wrap them with LoRA adapters."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.model.tiny import resolve_builtin_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
log = logging.getLogger("tunelab")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str | None = None) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if (device or default_device()).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_path(name_or_path: str, what: str = "pretrained_model_name_or_path") -> str:
    """A local folder holding config.json for a folder, cached hub id or builtin:tiny-*; else UserError."""
    name_or_path = resolve_builtin_model(name_or_path)
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix == ".pth" and path.exists():  # a tunelab .pth or an engine's checkpoint folder
        raise UserError(f"{what} '{name_or_path}': is a training checkpoint, not a model; convert it first with "
                        f"`tunelab convert pth_to_hf CONFIG {name_or_path} ./hf` and give ./hf")
    if path.is_file():
        raise UserError(f"{what} '{name_or_path}': is a file, not a model folder; give the Hugging Face model "
                        f"folder (the one holding config.json)")
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"{what} '{name_or_path}': the folder has no config.json; point it at a "
                            f"Hugging Face model folder")
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.exists()
    if looks_local:
        raise UserError(f"{what} '{name_or_path}': model folder not found; download the model and give "
                        f"its folder (relative paths start from {os.getcwd()})")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the hub unless offline
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"{what} '{name_or_path}': not in the local Hugging Face cache and HF_HUB_OFFLINE "
                        f"is set; download it first or give a local folder")
    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                               "*.py", "*.txt", "*.tiktoken"])
    except Exception as exc:  # noqa: BLE001 - network, auth or missing repo
        raise UserError(f"{what} '{name_or_path}': not found locally and could not be downloaded "
                        f"({type(exc).__name__}); download it and give the local folder") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    """bitsandbytes settings: 4 = NF4 with double quantisation (QLoRA), 8 = LLM.int8."""
    if not bits:
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401 - fail here with a clear message rather than deep in transformers
    except ImportError:
        raise UserError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from None
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--bits must be 4 or 8, got {bits}")


def load_model(path: str, *, dtype: torch.dtype, bits: int | None = None, device: str | None = None,
               trust_remote_code: bool = False, **kwargs):
    """A causal LM on `device`, optionally quantised to 4 or 8 bits."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    quant = quantization_config(bits, dtype)
    if "attn_implementation" not in kwargs:
        from transformers import AutoConfig

        try:
            impl = attention_implementation(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
        except Exception:  # noqa: BLE001 - a config only its remote code reads: from_pretrained says why below
            impl = None
        if impl:
            kwargs["attn_implementation"] = impl
            log.info("attention: eager, which applies the model's attention-score softcapping (sdpa skips it "
                     "in some transformers versions)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, quantization_config=quant,
        device_map={"": device} if quant is not None or device != "cpu" else None, **kwargs)
    return model


def attention_implementation(config) -> str | None:
    """'eager' for a model whose attention scores are softcapped (Gemma 2): Hugging Face's eager attention applies
    the cap in every transformers version, while its sdpa attention left it out without a word in some (5.17, the
    GPU machine's: a tiny Gemma 2's loss moved by 0.1%, its gradients to cosine 0.77; bench/RESULTS.md), which
    trains and runs another model. None: the model's own default. A text-and-image config keeps the field in its
    text config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else None


def add_lora(model, cfg, quantized: bool, prepare: bool = True, model_path: str | None = None):
    """Wrap a model with fresh LoRA adapters as the config says. `prepare` runs PEFT's k-bit preparation
    (fp32 norms/embeddings, input gradients) on a quantized model, which the plain forward needs. `model_path`:
    the base's folder, whose full-precision weights lora_init 'loftq' reads."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        _keep_4bit_layout(model)
    if quantized and prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    _check_target_names(model, cfg.lora_target_modules)
    init = getattr(cfg, "lora_init", "default")
    # loftq: PEFT's own LoftQ runs on CUDA only and ignores the LoRA scale; tunelab sets A and B itself below
    peft_init = True if init in ("default", "loftq") else init
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=language_model_targets(model, cfg.lora_target_modules), task_type="CAUSAL_LM",
                      use_rslora=getattr(cfg, "use_rslora", False), use_dora=getattr(cfg, "use_dora", False),
                      init_lora_weights=peft_init)
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"lora_target_modules {cfg.lora_target_modules!r}: {exc}") from None
    if init == "loftq":
        _loftq_init(model, model_path or resolve_model_path(cfg.pretrained_model_name_or_path))
    if moves_base_weights(init):
        from peft import get_peft_model_state_dict

        # the adapter's start, which PiSSA/OLoRA took out of the base: what an exported adapter subtracts so
        # that it applies to the original base (model.save.original_base_adapter)
        model.tunelab_initial_adapter = {k: v.detach().cpu().clone()
                                         for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k}
    return model


def _check_target_names(model, targets) -> None:
    """Every name in a list of LoRA targets must name modules of this model. PEFT stops only when none does: Llama's
    names on a Phi-3 model (fused qkv_proj, gate_up_proj) would put adapters on o_proj and down_proj alone."""
    if not isinstance(targets, (list, tuple)):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"lora_target_modules: {', '.join(map(repr, missing))} "
                        f"{'names' if len(missing) == 1 else 'name'} no module of this "
                        f"{type(model).__name__}; its linear layers are {', '.join(_linear_names(model))} (or use "
                        "'all-linear')")


def _linear_names(model, prefix: str = "") -> list[str]:
    """The names of the linear layers under `prefix` ('': all), the output head left out (as 'all-linear' does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name.startswith(prefix) and isinstance(m, torch.nn.Linear) and m is not head})


def language_model_targets(model, targets):
    """LoRA targets as PEFT takes them. A text-and-image model (Gemma 3 from 4B on) trains here on text only, so
    its adapters go on the language model's modules alone (a pattern over their paths): its vision tower never
    runs, and an adapter there would only take memory and keep the fast path off."""
    prefix = next((name for name, _ in model.named_modules() if name.endswith("language_model")), None)
    if prefix is None or targets is None or (isinstance(targets, str) and targets != "all-linear"):
        return targets
    if targets == "all-linear":
        targets = _linear_names(model, prefix + ".")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, targets))})"


def moves_base_weights(lora_init: str) -> bool:
    """PiSSA and OLoRA start the adapter at part of each weight and subtract that part from the base."""
    return lora_init.startswith("pissa") or lora_init == "olora"


@torch.no_grad()
def _loftq_init(model, model_path: str) -> None:
    """LoftQ with the 4-bit base as loaded (one alternation): each adapter starts at the best rank-r
    approximation of W - dequant(NF4(W)), W read from the base's .safetensors, so base + adapter is closer to
    W than the base alone. The base weights stay as loaded, so the adapter applies to the original base."""
    import bitsandbytes as bnb

    read = _safetensors_reader(model_path)
    for name, module in model.base_model.model.named_modules():
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if not hasattr(module, "lora_A") or getattr(weight, "quant_state", None) is None:
            continue
        original = read(f"{name}.weight").to(weight.device, torch.float32)
        residual = original - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        for adapter in module.lora_A:
            r, scale = module.r[adapter], module.scaling[adapter]
            root = (S[:r] / scale).sqrt()  # scale * B @ A = U_r S_r Vh_r
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            lora_a.copy_((root[:, None] * Vh[:r]).to(lora_a.dtype))
            lora_b.copy_((U[:, :r] * root).to(lora_b.dtype))


def _safetensors_reader(model_path: str):
    """name -> full-precision tensor from a model folder's model.safetensors (or its shards)."""
    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        files = None
    else:
        raise UserError(f"lora_init 'loftq' reads the base's full-precision weights from its .safetensors files; "
                        f"{model_path} has none")

    def read(name: str) -> torch.Tensor:
        file = folder / "model.safetensors" if files is None else files.get(name)
        if file is not None:
            with safe_open(str(file), "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise UserError(f"lora_init 'loftq': {model_path} has no weight '{name}' in its .safetensors files")
    return read


def _keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel. On a CPU with AVX512-BF16
    its Linear4bit does that, in place, at the first forward in eval mode without gradients (an evaluation
    during training); from then on its training forward runs a kernel with no backward for the input (wrong
    gradients, which it only warns about) and the fast path would dequantise the repacked bytes as NF4."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def check_adapter_fits(base_path: str, adapter: Path, trust_remote_code: bool = False) -> None:
    """Before any weight loads: every LoRA module of the adapter must exist in the base model with the shape
    it was trained on (read from the adapter file's header and from the base's config on the meta device).
    UserError naming both models otherwise; PEFT would only fail midway with a long size-mismatch dump."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older .bin adapter: PEFT's own check applies
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    trained_on = adapter_config.get("base_model_name_or_path") or "an unrecorded base model"
    try:
        config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a model class this cannot build without its weights: leave it to PEFT
        return
    shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    transposed = bool(adapter_config.get("fan_in_fan_out"))  # Conv1D weights are stored (in, out)
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if not match:
                continue
            module, part = match.groups()
            lora = tuple(f.get_slice(key).get_shape())
            base_shape = shapes.get(f"{module}.weight")
            if base_shape is None:
                problem = f"the base has no module {module}"
            else:
                out_dim, in_dim = base_shape[::-1] if transposed else base_shape[:2]
                wanted = lora[1] if part == "A" else lora[0]
                have = in_dim if part == "A" else out_dim
                if wanted == have:
                    continue
                problem = (f"{module} has {have} {'inputs' if part == 'A' else 'outputs'} in the base, "
                           f"{wanted} in the adapter")
            raise UserError(f"adapter '{adapter}' was trained on '{trained_on}' and does not fit the base model "
                            f"'{base_path}' ({problem}); give the base model the adapter was trained on")


def read_metadata(folder: str | Path) -> dict:
    """tunelab.json written beside adapters and merged models (template, system), or {}."""
    file = Path(folder) / "tunelab.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def write_metadata(folder: str | Path, **values) -> None:
    (Path(folder) / "tunelab.json").write_text(json.dumps(values, ensure_ascii=False, indent=2), encoding="utf-8")
