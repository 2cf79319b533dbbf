"""`tunelab serve` under malformed requests: a property-based test (hypothesis) over the request schema sends
300 bodies that each break it in one way to a real server on 127.0.0.1; every one gets a 4xx in OpenAI's
error shape, and the server keeps serving (health and a real completion afterwards)."""
from __future__ import annotations

import json

import pytest

from conftest import start_server

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

NAME = "tiny"
GOOD = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    proc, base = start_server(tiny_llama, tmp_path_factory.mktemp("fuzz") / "serve.log", "--model-name", NAME,
                              "--max-tokens-limit", "64")
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client, proc
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- malformed bodies: each breaks the schema in one way -----------------------------------------------------
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
not_a_number = st.one_of(st.just("x") | words.map(lambda w: "x" + w), st.lists(st.integers(), max_size=2),
                         st.dictionaries(words, st.integers(), max_size=2), st.booleans().map(lambda b: [b]))
not_text = st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), min_size=1, max_size=2),
                     st.dictionaries(words, st.integers(), min_size=1, max_size=2))
fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
# field -> values the schema refuses (pydantic's lax mode accepts '0.5' for a float and 'yes' for a bool)
BAD_FIELDS = {
    "model": st.one_of(not_text, st.none()),
    "messages": st.one_of(st.just([]), not_text, st.text(max_size=5), st.none(),
                          st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), min_size=1, max_size=3)),
    "temperature": st.one_of(not_a_number, st.floats(max_value=-0.01, allow_nan=False),
                             st.floats(min_value=2.01, allow_infinity=False), st.just(float("nan"))),
    "top_p": st.one_of(not_a_number, st.floats(max_value=0, allow_nan=False), st.floats(min_value=1.01)),
    "max_tokens": st.one_of(not_a_number, st.integers(max_value=0), st.integers(min_value=65), fractions),
    "max_completion_tokens": st.one_of(not_a_number, st.integers(max_value=0), st.integers(min_value=65)),
    "stop": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                      st.lists(st.text(min_size=1, max_size=3), min_size=17, max_size=20)),
    "seed": st.one_of(not_a_number, fractions, st.integers(min_value=2**64), st.integers(max_value=-2**63 - 1)),
    "n": st.one_of(st.integers(min_value=2), st.integers(max_value=0), not_a_number),
    "stream": st.one_of(st.just("maybe"), st.lists(st.booleans(), max_size=2), st.integers(min_value=2)),
    "stream_options": st.one_of(not_text.filter(lambda v: not isinstance(v, dict)),
                                st.fixed_dictionaries({"include_usage": st.just("maybe")})),
}
bad_message = st.one_of(
    st.fixed_dictionaries({"role": words.filter(lambda r: r not in ("system", "developer", "user", "assistant")),
                           "content": st.just("hi")}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.integers(), st.booleans(),
                                                                        st.dictionaries(words, words, max_size=2))}),
    st.fixed_dictionaries({"content": st.just("hi")}),
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": st.lists(st.fixed_dictionaries({"text": words}), min_size=1, max_size=2)}),
)
# conversations the schema accepts but the chat cannot answer: they must be a 400 too
bad_order = st.sampled_from([
    [{"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}],
    [{"role": "system", "content": "be brief"}],
])


@st.composite
def malformed(draw) -> bytes:
    kind = draw(st.sampled_from(["field", "missing", "message", "order", "model", "not_json", "not_object"]))
    body = json.loads(json.dumps(GOOD))
    if kind == "field":
        field = draw(st.sampled_from(sorted(BAD_FIELDS)))
        body[field] = draw(BAD_FIELDS[field])
    elif kind == "missing":
        del body[draw(st.sampled_from(["model", "messages"]))]
    elif kind == "message":
        messages = draw(st.lists(st.just({"role": "user", "content": "hi"}), max_size=2))
        messages.insert(draw(st.integers(0, len(messages))), draw(bad_message))
        body["messages"] = messages
    elif kind == "order":
        body["messages"] = draw(bad_order)
    elif kind == "model":
        body["model"] = draw(words.filter(lambda m: m != NAME))
    elif kind == "not_json":
        raw = draw(st.binary(max_size=40))
        try:
            json.loads(raw)
            raw = b"{" + raw  # still parses: make it not
        except (ValueError, UnicodeDecodeError):
            pass
        return raw
    else:
        return json.dumps(draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                                         st.none()))).encode()
    if "stream" not in body and draw(st.booleans()):
        body["stream"] = True  # streaming requests are checked before the first byte goes out
    return json.dumps(body).encode()


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    client, proc = server
    answered: list[int] = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=malformed())
    @example(body=json.dumps(dict(GOOD, seed=2**64)).encode())  # valid JSON int, beyond what torch seeds with
    @example(body=json.dumps(dict(GOOD, temperature=float("nan"))).encode())
    def one_request(body: bytes) -> None:
        response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        answered.append(response.status_code)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text

    one_request()
    assert len(answered) >= 300 and proc.poll() is None
    assert client.get("/health").json()["status"] == "ok"
    reply = client.post("/v1/chat/completions", json=GOOD)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
