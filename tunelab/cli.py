"""The `tunelab` command: parse the verb, run it, turn bad input into one line and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import warnings
from pathlib import Path

from tunelab.errors import TrainingInterrupted, TrainingStopped, UserError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _config_keys_help() -> str:
    from tunelab.config.schema import FIELDS

    lines = ["config keys (set in the config file or with --cfg-options key=value):"]
    for name, f in FIELDS.items():
        lines.append(f"  {name}")
        lines += ["      " + t for t in textwrap.wrap(f.metadata["help"], 90)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune LLMs (full, LoRA, QLoRA) from a "
                                     "config file; convert, merge and chat with the result.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("list-cfg", help="list built-in configs")
    p.add_argument("-p", "--pattern", help="only names containing this text (case-insensitive)")

    p = verbs.add_parser("copy-cfg", help="write DIR/NAME_copy.py, a complete commented config")
    p.add_argument("name")
    p.add_argument("dir")

    p = verbs.add_parser("train", help="fine-tune as a config says", epilog=_config_keys_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a config file (.py) or a built-in name (tunelab list-cfg)")
    p.add_argument("--work-dir", help="output folder (default work_dirs/<config name>)")
    p.add_argument("--seed", type=int, help="random seed (overrides the config)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PTH",
                   help="continue from the newest checkpoint in the work dir, or from PTH")
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--deepspeed", metavar="NAME_OR_JSON",
                   help="train with DeepSpeed: deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, "
                        "deepspeed_zero3, deepspeed_zero3_offload, or a DeepSpeed JSON file (pip install "
                        "'tunelab[deepspeed]'). Several GPUs/machines: set NPROC_PER_NODE (and NNODES, "
                        "NODE_RANK, ADDR, PORT); tunelab starts torchrun itself")

    conv = verbs.add_parser("convert", help="pth_to_hf, merge, split, gguf").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = conv.add_parser("pth_to_hf", help="training checkpoint -> PEFT adapter folder or HF model")
    p.add_argument("config")
    p.add_argument("pth")
    p.add_argument("save_dir")
    p.add_argument("--fp32", action="store_true", help="save weights in float32")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--safe-serialization", action="store_true",
                   help="accepted for XTuner compatibility: tunelab always writes safetensors")
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    p = conv.add_parser("merge", help="fold an adapter into its base model")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("save_dir")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p = conv.add_parser("split", help="re-shard a Hugging Face model folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--trust-remote-code", action="store_true")
    p = conv.add_parser("gguf", help="model -> one GGUF file for llama.cpp and Ollama",
                        description="Write MODEL (a merged model, a base with --adapter, or an adapter folder) as "
                        "OUT.gguf with llama.cpp's gguf package (pip install 'tunelab[gguf]'): weights, tokenizer, "
                        "the chat template the model was trained with and its stop token. Llama, Mistral, Qwen2 "
                        "and Qwen3 models.")
    p.add_argument("model")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--adapter", help="a LoRA adapter folder, merged into MODEL on the fly")
    p.add_argument("--outtype", default="f16", help="weight type: " + _gguf_outtypes())
    p.add_argument("--ollama", action="store_true",
                   help="also write a Modelfile beside OUT (FROM, TEMPLATE, SYSTEM, PARAMETER stop): "
                        "then `ollama create NAME -f Modelfile`")
    p.add_argument("--trust-remote-code", action="store_true")

    p = verbs.add_parser("upload", help="an adapter or model folder to the Hugging Face Hub, with a model card",
                         description="Upload FOLDER (work_dirs/<config>/hf or a merged model) to the Hub repo "
                         "REPO_ID (created if missing) in one commit, with a generated README.md model card: base "
                         "model, data, template, algorithm, settings, final loss, the loss plot and how to chat.")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="a Hub token with write access (default: $HF_TOKEN or the stored login)")

    p = verbs.add_parser("check-custom-dataset", help="validate every record of a config's data and report")
    p.add_argument("config")
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    p = verbs.add_parser("log-dataset", help="show the first sample as the model sees it, trained parts marked")
    p.add_argument("config")
    p.add_argument("--show", choices=["text", "masked_text", "input_ids", "labels", "all"], default="all")
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")

    data = verbs.add_parser("data", help="dataset preparation: xlsx2jsonl, split").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = data.add_parser("xlsx2jsonl", help="spreadsheet (.xlsx or .csv) rows -> conversation JSON Lines")
    p.add_argument("file")
    p.add_argument("--sheet", help="sheet name (default: the first sheet)")
    p.add_argument("--input-col", required=True, help="question column: a letter (A) or a header name")
    p.add_argument("--output-col", required=True, help="answer column: a letter (D) or a header name")
    p.add_argument("--system", default="", help="system text put in every record")
    p.add_argument("-o", "--output", required=True, help="the .jsonl file to write")
    p = data.add_parser("split", help="split records into DIR/train.jsonl and DIR/test.jsonl")
    p.add_argument("file")
    p.add_argument("--ratio", type=float, default=0.7, help="fraction that goes to train.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output folder")

    p = verbs.add_parser("chat", help="chat with a model (merged, base + --adapter, or an adapter folder)")
    p.add_argument("model")
    p.add_argument("--adapter")
    p.add_argument("--prompt-template", help="default: the template the model was trained with")
    p.add_argument("--system", help="system text (default: the one the model was trained with)")
    p.add_argument("--system-template", metavar="NAME",
                   help="a named system text: a built-in dataset's (alpaca, code_alpaca, medical, ...), "
                        "moss_sft (plugin instruction) or lagent (agent prompt)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the model in 4-bit NF4 or 8-bit")
    p.add_argument("--torch-dtype", choices=["fp16", "bf16", "fp32", "auto"], default="auto")
    p.add_argument("--bot-name", default="BOT", help="the assistant's name ({bot_name} in system texts)")
    p.add_argument("--with-plugins", nargs="+", metavar="PLUGIN", default=[],
                   help="tools the model may call: calculate solve search (MOSS-style commands, or the "
                        "tools of --lagent); search needs SERPER_API_KEY")
    p.add_argument("--lagent", action="store_true",
                   help="ReAct agent mode (Thought/Action/Action Input/Response/Final Answer) with the tools "
                        "of --with-plugins (default: all)")
    p.add_argument("--tools", metavar="FILE",
                   help="a JSON list of functions the model may call, written in the template's tool format; "
                        "each call is shown and the next line you type is its result")
    p.add_argument("--stop-words", nargs="+", default=[], help="extra words at which an answer ends")
    p.add_argument("--command-stop-word", help="plugins: the word that ends the model's commands (<eoc>)")
    p.add_argument("--answer-stop-word", help="older spelling: an extra word at which an answer ends")
    p.add_argument("--offload-folder", help="folder for weights that do not fit in memory")
    p.add_argument("--no-streamer", action="store_true", help="print each answer whole")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.75)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")

    for verb, about in (("serve", "OpenAI-compatible HTTP API and a chat page for a model"),
                        ("web", "like serve, and open the chat page in a browser")):
        _add_serve_args(verbs.add_parser(verb, help=about))
    return parser


def _gguf_outtypes() -> str:
    from tunelab.export.gguf import OUTTYPES_HELP

    return OUTTYPES_HELP


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a merged model, a base model with --adapter, or an adapter folder")
    p.add_argument("--adapter")
    p.add_argument("--prompt-template", help="default: the template the model was trained with")
    p.add_argument("--system", help="default system text (a request's system message replaces it)")
    p.add_argument("--bits", type=int, choices=[4, 8])
    p.add_argument("--torch-dtype", choices=["fp16", "bf16", "fp32", "auto"], default="auto")
    p.add_argument("--stop-words", nargs="+", default=[], help="extra stop words for every request")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $TUNELAB_API_KEY; none = open)")
    p.add_argument("--model-name", help="the model id clients use (default: the model folder's name)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get HTTP 413")
    p.add_argument("--max-new-tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument("--temperature", type=float, default=0.1, help="when a request gives none; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.75, help="when a request gives none")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--trust-remote-code", action="store_true")


def cmd_list_cfg(args) -> int:
    from tunelab.config.catalogue import BUILTIN

    pattern = (args.pattern or "").lower()
    names = [name for name in BUILTIN if pattern in name.lower()]
    if not names:  # an empty answer would look like a tool that found nothing to list at all
        print(f"tunelab: no built-in config matches '{args.pattern}'; `tunelab list-cfg` lists them all",
              file=sys.stderr)
        return EXIT_FAILURE
    print("\n".join(names))
    return EXIT_OK


def cmd_copy_cfg(args) -> int:
    from tunelab.config.catalogue import BUILTIN
    from tunelab.config.loader import render_config
    from tunelab.config.schema import suggest

    if args.name not in BUILTIN:
        raise UserError(f"copy-cfg: no built-in config '{args.name}'{suggest(args.name, BUILTIN)}; "
                        f"`tunelab list-cfg` lists them")
    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"copy-cfg: '{folder}' is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{args.name}_copy.py"
    target.write_text(render_config(BUILTIN[args.name], args.name), encoding="utf-8")
    print(f"Copied to {target}")
    return EXIT_OK


def cmd_train(args) -> int:
    from tunelab.train import launch
    from tunelab.config.loader import load_config
    from tunelab.train.loop import train

    cfg, name = load_config(args.config, args.cfg_options)  # bad input fails here, once, before any launch
    deepspeed = None
    if args.deepspeed:
        from tunelab.train import deepspeed_config

        deepspeed = deepspeed_config.load(args.deepspeed)
        deepspeed_config.require_deepspeed()
    if launch.launch_requested():  # NPROC_PER_NODE > 1 or NNODES > 1: run under torchrun
        return launch.launch(args.argv)
    train(cfg, name, work_dir=args.work_dir, seed=args.seed, resume=args.resume, deepspeed=deepspeed)
    return EXIT_OK


def cmd_convert(args) -> int:
    from tunelab.export import convert

    if args.action == "pth_to_hf":
        from tunelab.config.loader import load_config

        cfg, _ = load_config(args.config, args.cfg_options)
        convert.pth_to_hf(cfg, args.pth, args.save_dir, fp32=args.fp32, max_shard_size=args.max_shard_size)
    elif args.action == "gguf":
        from tunelab.export.gguf import to_gguf

        made = to_gguf(args.model, args.out, args.adapter, args.outtype, args.trust_remote_code)
        print(f"Saved to {args.out}")
        if args.ollama:
            from tunelab.export.ollama import write_modelfile

            modelfile = write_modelfile(Path(args.out), made["template"], made["system"], made["eos_token"])
            print(f"Saved to {modelfile} (ollama create NAME -f {modelfile})")
            if made["template"] is None:
                print("note: the model has no named tunelab template, so the Modelfile has no TEMPLATE; Ollama "
                      "derives one from the GGUF's chat template", file=sys.stderr)
        return EXIT_OK
    elif args.action == "merge":
        convert.merge(args.base, args.adapter, args.save_dir, args.max_shard_size, args.device,
                      args.trust_remote_code)
    else:
        convert.split(args.src, args.dst, args.max_shard_size, args.trust_remote_code)
    print(f"Saved to {getattr(args, 'save_dir', None) or args.dst}")
    return EXIT_OK


def cmd_upload(args) -> int:
    from tunelab.export.hub import upload

    print(f"Uploaded to {upload(args.folder, args.repo_id, args.private, args.token)}")
    return EXIT_OK


def cmd_chat(args) -> int:
    from tunelab.chat.session import ChatOptions, chat
    from tunelab.model.generate import Sampling

    # without plugins the command stop word is just another stop word (XTuner's old flags)
    plugin_mode = bool(args.with_plugins) and not args.lagent
    stops = list(args.stop_words) + ([args.command_stop_word] if args.command_stop_word and not plugin_mode else [])
    opts = ChatOptions(
        model=args.model, adapter=args.adapter, prompt_template=args.prompt_template, system=args.system,
        system_template=args.system_template, bits=args.bits, torch_dtype=args.torch_dtype, stop_words=stops,
        command_stop_word=args.command_stop_word, answer_stop_word=args.answer_stop_word,
        streamer=not args.no_streamer, seed=args.seed, trust_remote_code=args.trust_remote_code,
        bot_name=args.bot_name, plugins=list(args.with_plugins), lagent=args.lagent,
        offload_folder=args.offload_folder, tools=args.tools,
        sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty))
    return chat(opts)


def cmd_serve(args) -> int:
    from tunelab.chat.session import ChatOptions
    from tunelab.model.generate import Sampling
    from tunelab.serve import ServeOptions, serve

    chat = ChatOptions(
        model=args.model, adapter=args.adapter, prompt_template=args.prompt_template, system=args.system,
        bits=args.bits, torch_dtype=args.torch_dtype, stop_words=list(args.stop_words), streamer=True,
        trust_remote_code=args.trust_remote_code,
        sampling=Sampling(max_new_tokens=min(args.max_new_tokens, args.max_tokens_limit),
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty))
    return serve(ServeOptions(chat=chat, host=args.host, port=args.port, api_key=args.api_key or None,
                              model_name=args.model_name, max_queue=args.max_queue,
                              max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                              open_browser=args.verb == "web"))


def cmd_check_dataset(args) -> int:
    from tunelab.config.loader import load_config
    from tunelab.data.inspect import check_dataset

    cfg, _ = load_config(args.config, args.cfg_options)
    print(check_dataset(cfg, _tokenizer_for))
    return EXIT_OK


def cmd_log_dataset(args) -> int:
    from tunelab.config.loader import load_config
    from tunelab.data.inspect import show_first_sample

    cfg, _ = load_config(args.config, args.cfg_options)
    print(show_first_sample(cfg, args.show, _tokenizer_for))
    return EXIT_OK


def _tokenizer_for(cfg):
    from tunelab.model.load import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(cfg.pretrained_model_name_or_path), cfg.trust_remote_code)


def cmd_data(args) -> int:
    from tunelab.data import prepare

    if args.action == "xlsx2jsonl":
        print(prepare.xlsx_to_jsonl(args.file, args.output, input_col=args.input_col, output_col=args.output_col,
                                    sheet=args.sheet, system=args.system))
    else:
        print(prepare.split_file(args.file, args.output, ratio=args.ratio, seed=args.seed))
    return EXIT_OK


COMMANDS = {"list-cfg": cmd_list_cfg, "copy-cfg": cmd_copy_cfg, "train": cmd_train, "convert": cmd_convert,
            "chat": cmd_chat, "check-custom-dataset": cmd_check_dataset, "log-dataset": cmd_log_dataset,
            "data": cmd_data, "serve": cmd_serve, "web": cmd_serve, "upload": cmd_upload}


def _setup_logging() -> None:
    """tunelab's own lines to stderr; libraries' chatter only when it is an error."""
    log = logging.getLogger("tunelab")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for noisy in ("bitsandbytes", "kernels", "peft", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    from tunelab.train.launch import record_exit

    code = _main(argv)
    record_exit(code)  # a torchrun worker tells the launching `tunelab train` how it ended
    return code


def _main(argv: list[str] | None) -> int:
    from tunelab.train.launch import error_line  # only rank 0 of several prints the final error line

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if args.verb in ("train", "convert", "chat", "check-custom-dataset", "log-dataset", "serve", "web"):
            _quiet_libraries()
        return COMMANDS[args.verb](args)
    except UserError as exc:
        error_line(f"tunelab: error: {exc}")
        return EXIT_BAD_INPUT
    except TrainingInterrupted as exc:  # a checkpoint was saved; say where, no traceback
        error_line(f"tunelab: {exc}")
        return exc.exit_code
    except TrainingStopped as exc:
        error_line(f"tunelab: error: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tunelab list-cfg | head`
        sys.stderr.close()
        return EXIT_OK
