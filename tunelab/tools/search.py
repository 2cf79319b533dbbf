"""Web search through the Serper API (https://serper.dev): POST {"q": query} with the key in X-API-KEY; the
answer box, knowledge graph and organic results come back as JSON and are turned into a short numbered list.

Environment: SERPER_API_KEY (required), TUNELAB_SERPER_URL (endpoint; default Serper's search endpoint, tests
point it at a local server), TUNELAB_SEARCH_TIMEOUT (seconds, default 10)."""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

from tunelab.tools import ToolError

DEFAULT_URL = "https://google.serper.dev/search"
DEFAULT_TIMEOUT_S = 10.0
MAX_RESULTS = 5
MAX_QUERY_CHARS = 500


def _timeout() -> float:
    raw = os.environ.get("TUNELAB_SEARCH_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ToolError(f"TUNELAB_SEARCH_TIMEOUT='{raw}' is not a number of seconds") from None


def format_results(data: dict, limit: int = MAX_RESULTS) -> str:
    """Serper's JSON -> numbered lines: the direct answer first (answer box, knowledge graph), then results."""
    lines: list[str] = []
    box = data.get("answerBox") or {}
    direct = box.get("answer") or box.get("snippet")
    if direct:
        lines.append(f"{box.get('title', 'Answer')}: {direct}")
    graph = data.get("knowledgeGraph") or {}
    if graph.get("description"):
        lines.append(f"{graph.get('title', 'About')}: {graph['description']}")
    for item in (data.get("organic") or [])[:limit]:
        if not isinstance(item, dict):
            continue
        text = " ".join(str(item.get(k, "")).strip() for k in ("title", "snippet") if item.get(k))
        if text:
            lines.append(f"{text} ({item['link']})" if item.get("link") else text)
    if not lines:
        return "no results"
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def search(query: str) -> str:
    """Top web results for `query` as text; ToolError with a readable reason on any failure."""
    query = query.strip()
    if not query:
        raise ToolError("search: the query is empty")
    query = query[:MAX_QUERY_CHARS]
    key = os.environ.get("SERPER_API_KEY", "").strip()
    if not key:
        raise ToolError("search: SERPER_API_KEY is not set; get a key at https://serper.dev and "
                        "`export SERPER_API_KEY=...` before starting the chat")
    url = os.environ.get("TUNELAB_SERPER_URL", "").strip() or DEFAULT_URL
    timeout = _timeout()
    request = urllib.request.Request(url, data=json.dumps({"q": query}).encode("utf-8"), method="POST",
                                     headers={"X-API-KEY": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(2_000_000)
    except urllib.error.HTTPError as exc:
        hint = " (the key was refused; check SERPER_API_KEY)" if exc.code in (401, 403) else ""
        raise ToolError(f"search: the search service answered HTTP {exc.code} {exc.reason}{hint}") from None
    except (socket.timeout, TimeoutError):
        raise ToolError(f"search: no answer from {url} within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise ToolError(f"search: no answer from {url} within {timeout:g} s") from None
        raise ToolError(f"search: cannot reach {url} ({exc.reason}); check the network connection") from None
    except (OSError, ValueError) as exc:
        raise ToolError(f"search: the request to {url} failed ({exc})") from None
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ToolError("search: the search service did not answer with JSON") from None
    if not isinstance(data, dict):
        raise ToolError("search: the search service answered with unexpected JSON")
    return format_results(data)
