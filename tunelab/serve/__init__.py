"""`tunelab serve` / `tunelab web`: the fine-tuned model behind an OpenAI-compatible HTTP API and a chat
page, with the same prompt template and stop words as `tunelab chat`.

FastAPI and uvicorn are optional (`pip install 'tunelab[serve]'`); they are imported only here."""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab.chat.session import ChatOptions
from tunelab.errors import UserError

log = logging.getLogger("tunelab")


@dataclass
class ServeOptions:
    chat: ChatOptions
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id clients use; default: the model (or adapter) folder's name
    max_queue: int = 32
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1 << 20
    open_browser: bool = False


def _require_backend() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'tunelab[serve]'") from None


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or a UserError saying why not (port in use, bad host)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host '{host}': cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_model_name(opts: ChatOptions) -> str:
    """The folder's name; for a training run's `work_dirs/<config>/hf`, the config's name."""
    folder = Path(opts.adapter or opts.model).expanduser().resolve()
    return (folder.parent.name if folder.name == "hf" else folder.name) or "tunelab"


def serve(opts: ServeOptions) -> int:
    """Load the model, then serve until Ctrl-C."""
    _require_backend()
    import uvicorn

    from tunelab.chat.session import load_chat_model
    from tunelab.serve.app import Limits, create_app
    from tunelab.serve.worker import GenerationWorker

    if opts.max_queue < 1 or opts.max_tokens_limit < 1 or opts.max_body_bytes < 1024:
        raise UserError("--max-queue and --max-tokens-limit must be at least 1, --max-body-bytes at least 1024")
    sock = _bind(opts.host, opts.port)
    model, tokenizer, fmt = load_chat_model(opts.chat)
    name = opts.model_name or default_model_name(opts.chat)
    engine = GenerationWorker(model, tokenizer, max_queue=opts.max_queue)
    context = getattr(model.config, "max_position_embeddings", None)
    limits = Limits(max_body_bytes=opts.max_body_bytes, max_tokens=opts.max_tokens_limit)
    sampling = opts.chat.sampling
    app = create_app(engine, fmt, name, sampling, opts.chat.stop_words, limits, opts.api_key, context)

    port = sock.getsockname()[1]
    shown_host = f"[{opts.host}]" if ":" in opts.host else opts.host
    url = f"http://{shown_host}:{port}/"
    if not _is_loopback(opts.host) and not opts.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                    opts.host)
    log.info("serving '%s' (template %s) at %s - chat page at /, OpenAI API at %sv1", name, fmt.name, url, url)
    if opts.open_browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
