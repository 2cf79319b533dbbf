"""The HTTP side of `tunelab serve`: OpenAI-compatible routes, the request schema, errors in OpenAI's
shape ({"error": {"message", "type", "param", "code"}}), server-sent-event streaming, and the chat page."""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
import uuid
from dataclasses import dataclass, replace
from importlib import resources
from typing import Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data.encode import PromptFormat
from tunelab.data.formats import Turn
from tunelab.data.tool_records import messages_to_turns as tool_turns, openai_messages, parse_tools
from tunelab.data.turns import BadRecord, ToolCall
from tunelab.model.generate import Sampling
from tunelab.serve.worker import GenerationWorker, Job, QueueFull

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks whether its client is still there


@dataclass
class Limits:
    """What one request may ask for."""
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # the largest max_tokens a request may give
    max_stop_words: int = 16


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {...}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request schema --------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs, ...)


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: list[dict] | None = None  # an assistant's calls, as the API returned them
    tool_call_id: str | None = None       # a tool result: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # the range torch.manual_seed takes
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # as vLLM: keep generating to max_tokens (for load tests)
    tools: list[dict] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None


def request_tools(req: ChatRequest) -> list[dict]:
    """The tools the model is shown: none with tool_choice 'none', only the named one for a named choice."""
    try:
        tools = parse_tools(req.tools, "tools")
    except BadRecord as exc:
        raise ApiError(400, str(exc), param="tools") from None
    choice = req.tool_choice
    if choice == "none":
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise ApiError(400, f"tool_choice names '{name}', which is not in tools", param="tool_choice")
    return tools


def tool_messages_to_turns(messages: list[Message], tools: list[dict]) -> list[Turn]:
    """A conversation with tool calls or results -> turns, the last one open (the prompt to answer)."""
    try:
        common = openai_messages([m.model_dump(exclude_none=True) for m in messages])
        turns = tool_turns(common, tools, open_last=True, check_declared=False)
    except BadRecord as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None
    if not turns or turns[-1].output or turns[-1].calls:
        raise ApiError(400, "messages: the last message must be from the user or a tool", param="messages")
    return turns


def reply_message(text: str, fmt: PromptFormat, tools: list[dict]) -> tuple[dict, bool]:
    """The assistant message for a reply, its tool calls parsed out when tools were offered; and whether it
    holds calls."""
    content, calls = fmt.parse_reply(text) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None, "tool_calls": [openai_call(c) for c in calls]}, True


def openai_call(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def messages_to_turns(messages: list[Message]) -> list[Turn]:
    """OpenAI messages -> the (input, output) turns PromptFormat renders. System messages come first;
    consecutive messages of one role are joined; the last message must be the user's."""
    system, i = [], 0
    while i < len(messages) and messages[i].role in ("system", "developer"):
        system.append(messages[i].text())
        i += 1
    turns: list[Turn] = []
    for k, msg in enumerate(messages[i:], start=i):
        text = msg.text()
        if msg.role in ("system", "developer"):
            raise ApiError(400, f"messages[{k}]: system messages must come before the conversation",
                           param=f"messages.{k}.role")
        if msg.role == "user":
            if turns and not turns[-1].output:
                turns[-1].input += "\n\n" + text
            else:
                turns.append(Turn(text, ""))
        elif not turns:
            raise ApiError(400, f"messages[{k}]: the conversation must start with a user message",
                           param=f"messages.{k}.role")
        else:
            turns[-1].output = (turns[-1].output + "\n\n" + text) if turns[-1].output else text
    if not turns or turns[-1].output:
        raise ApiError(400, "messages: the last message must be from the user", param="messages")
    turns[0].system = "\n".join(s for s in system if s)
    return turns


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing bodies over `limit` bytes (413) and bad JSON (400)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:  # keep reading a while so the client gets our answer rather than a reset
            if size > 16 * limit:
                break
            continue
        body += chunk
    if too_big:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def parse_request(data: dict) -> ChatRequest:
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list", "function")))
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param=param or None) from None


# -- the app ------------------------------------------------------------------------------------------
def create_app(engine: GenerationWorker, fmt: PromptFormat, model_name: str, sampling: Sampling, extra_stop: list[str],
               limits: Limits, api_key: str | None = None, context_length: int | None = None) -> FastAPI:
    """The FastAPI application serving `engine` under the name `model_name`."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    # The worker thread decodes with the model's tokenizer; prompts are encoded here with a copy, because
    # a fast tokenizer must not be used by two threads at once.
    prompt_fmt = PromptFormat(copy.deepcopy(fmt.tokenizer), fmt.name, fmt.system)
    stop_words = fmt.stop_words + [w for w in extra_stop if w]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None).response()

    def authorize(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided" if token else
                           "Missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": engine.busy, "waiting": engine.waiting,
                "max_queue": engine.max_queue, **engine.counts}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str):
        if name != model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        req = parse_request(await read_json(request, limits.max_body_bytes))
        if req.model != model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}' "
                           f"(GET /v1/models)", param="model", code="model_not_found")
        tools = request_tools(req)
        if tools or any(m.role == "tool" or m.tool_calls for m in req.messages):
            turns = tool_messages_to_turns(req.messages, tools)
        else:
            turns = messages_to_turns(req.messages)
        ids, _ = prompt_fmt.encode(turns, open_last=True)
        job = make_job(req, ids)
        job.stream = req.stream and not tools  # calls are parsed from the whole reply
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind: str, value) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown)
                job.cancelled.set()

        job.on_event = on_event
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type_="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            reply = (lambda text: reply_message(text, prompt_fmt, tools)) if tools else None
            return StreamingResponse(stream(request, job, events, meta, len(ids), include_usage, reply),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
                continue
            if kind == "error":
                raise ApiError(500, str(value), type_="server_error")
            if kind == "done":
                break
        message, called = reply_message(value.text, prompt_fmt, tools)
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": "tool_calls" if called else finish(value.finish_reason)}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(len(ids), value.tokens),
                "system_fingerprint": None}

    def make_job(req: ChatRequest, ids: list[int]) -> Job:
        room = (context_length - len(ids)) if context_length else None
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {context_length}",
                           param="messages", code="context_length_exceeded")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens: at most {limits.max_tokens} on this server", param="max_tokens")
        max_new = min(x for x in (wanted or sampling.max_new_tokens, limits.max_tokens, room) if x is not None)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > limits.max_stop_words:
            raise ApiError(400, f"stop: at most {limits.max_stop_words} stop sequences", param="stop")
        job_sampling = replace(sampling, max_new_tokens=max_new,
                               temperature=sampling.temperature if req.temperature is None else req.temperature,
                               top_p=sampling.top_p if req.top_p is None else req.top_p,
                               min_new_tokens=max_new if req.ignore_eos else 0)
        words = [] if req.ignore_eos else stop_words + [s for s in stops if s]
        return Job(ids=ids, stop_words=words, sampling=job_sampling, on_event=lambda *_: None, seed=req.seed,
                   stream=req.stream)

    static = resources.files("tunelab.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    return app


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(request: Request, job: Job, events: asyncio.Queue, meta: dict, prompt_tokens: int,
                 include_usage: bool, reply=None):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Leaving early (the client
    disconnected) cancels the generation. With `reply` (tools offered), the whole reply is read for calls
    first: its text comes as one content delta, then each call as a tool_calls delta."""
    def chunk(delta: dict, reason: str | None = None) -> str:
        out = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            out["usage"] = None
        return sse(out)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":
                yield sse({"error": {"message": str(value), "type": "server_error", "param": None, "code": None}})
                break
            else:
                reason = finish(value.finish_reason)
                if reply is not None:
                    message, called = reply(value.text)
                    if message["content"]:
                        yield chunk({"content": message["content"]})
                    for i, call in enumerate(message.get("tool_calls") or []):
                        yield chunk({"tool_calls": [{"index": i, **call}]})
                    reason = "tool_calls" if called else reason
                yield chunk({}, reason)
                if include_usage:
                    yield sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                               "choices": [], "usage": usage(prompt_tokens, value.tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once it finished; stops the worker when the client went away
