"""Every dataset users bring (issue 31): tool calls in each published shape, rendered in each template's own
tool format with loss on the assistant's calls only; pretraining text; other tools' variants; mixing."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, assert_packed_equals_alone, run_cli, write_config
from published_chat_templates import LLAMA31_TOOLS
from tunelab.config.loader import load_config
from tunelab.data.dataset import DataStats, build_sequences, encode_samples, load_dialogues, pack
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.turns import ToolCall, ToolResult, Turn
from tunelab.errors import DataError
from tunelab.model.load import load_tokenizer

FIX = ROOT / "tests" / "fixtures" / "data"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]
# one tool round trip: question -> call -> result -> answer
ROUND_TRIP = [Turn("Weather in Oslo?", "", calls=[ToolCall("get_weather", {"city": "Oslo"}, "call_1")],
                   tools=WEATHER),
              Turn("", "It is 3 C.", results=[ToolResult('{"temp": 3}', "get_weather", "call_1")])]


def _cfg(data_path, **over):
    values = {"pretrained_model_name_or_path": "builtin:tiny-llama", "data_path": data_path, **over}
    cfg, _ = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return cfg


def _load(data_path, **over):
    stats = DataStats()
    return load_dialogues(_cfg(data_path, **over), stats), stats


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(str(tiny_models["qwen2"]))


def _text_and_trained(tokenizer, template, turns):
    ids, labels = PromptFormat(tokenizer, template).encode(turns)
    return tokenizer.decode(ids), tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


# --- 1. every public example is detected, read and rendered --------------------------------------------------
@pytest.mark.parametrize("path, extra, fmt, n", [
    ("xtuner/openai_sft.jsonl", {}, "openai", 3),
    ("xtuner/pretrain_example_data.jsonl", {}, "text", 3),
    ("llamafactory/glaive_toolcall_en_demo.json", {}, "sharegpt", 2),
    ("llamafactory/c4_demo.jsonl", {}, "text", 2),
    ("llamafactory/c4_demo_text.txt", {}, "text", 2),
    ("llamafactory", {"dataset": "glaive_toolcall_en_demo"}, "sharegpt", 2),
    ("llamafactory/dataset_info.json", {"dataset": "alpaca_en_demo"}, "alpaca", 2),
    ("llamafactory/dataset_info.json", {"dataset": "c4_demo"}, "text", 2),
    ("msswift/agent.jsonl", {}, "openai", 1),
    ("msswift/pretrain.jsonl", {}, "text", 3),
    ("msswift/sharegpt.jsonl", {}, "conversation", 1),
    ("msswift/query_response.jsonl", {}, "query_response", 1),
    ("openai/tool_calls.jsonl", {}, "openai", 2),
    ("trl/language_modeling.jsonl", {}, "text", 1),
    ("trl/conversational.jsonl", {}, "openai", 1),
    ("glaive/glaive_function_calling_v2.json", {}, "glaive", 1),
])
def test_each_public_example_is_detected_and_rendered(path, extra, fmt, n, tokenizer):
    dialogues, stats = _load(str(FIX / path), **extra)
    assert list(stats.formats.values()) == [fmt] and len(dialogues) == n
    for _, turns in dialogues:
        ids, labels = PromptFormat(tokenizer, "qwen_chat").encode(turns)
        assert any(lab != IGNORE for lab in labels)
        if fmt == "text":  # pretraining: no template, every token trained
            assert labels == ids and "<|im_start|>" not in tokenizer.decode(ids)


def test_tool_records_read_as_calls_and_results():
    lf = _load(str(FIX / "llamafactory/glaive_toolcall_en_demo.json"))[0]
    assert all(turns[0].tools and any(t.calls for t in turns) and any(t.results for t in turns) for _, turns in lf)
    _, swift = _load(str(FIX / "msswift/agent.jsonl"))[0][0]
    assert [c.arguments for c in swift[0].calls] == [{"city": "Beijing"}, {"city": "Shanghai"}]
    assert [r.call_id for r in swift[1].results] == [c.id for c in swift[0].calls]  # results answer calls in order
    openai_records = _load(str(FIX / "openai/tool_calls.jsonl"))[0]
    first, second = openai_records[0][1], openai_records[1][1]
    assert first[-1].calls[0].arguments == {"location": "San Francisco, USA", "format": "celsius"}
    assert second[1].results[0].content == "21.0" and second[1].output.startswith("It is 21 degrees")
    _, glaive = _load(str(FIX / "glaive/glaive_function_calling_v2.json"))[0][0]
    assert glaive[1].calls[0].arguments == {"base_currency": "USD", "target_currency": "GBP"}
    assert glaive[0].system.startswith("You are a helpful assistant") and glaive[2].results[0].content == \
        '{"exchange_rate": 0.73}'


# --- exact text and label mask of a tool round trip, per template ------------------------------------------------
def test_qwen25_tool_round_trip_exact(tokenizer):
    text, trained = _text_and_trained(tokenizer, "qwen_chat", ROUND_TRIP)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER[0]) + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>"
        "assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 3}\n</tool_response><|im_end|>\n<|im_start|>"
        "assistant\nIt is 3 C.<|im_end|>")
    # trained: the call and the answer with their end markers; never the tool's result
    assert trained == ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
                       "<|im_end|>It is 3 C.<|im_end|>")


def test_llama31_tool_round_trip_exact(tokenizer):
    text, trained = _text_and_trained(tokenizer, "llama3_chat", ROUND_TRIP)
    bos = tokenizer.bos_token or ""
    assert text == (
        bos + "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December "
        "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following "
        "functions, please respond with a JSON for a function call with its proper arguments that best answers the "
        "given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of argument name "
        "and its value}.Do not use variables.\n\n" + json.dumps(WEATHER[0], indent=4) + "\n\nWeather in Oslo?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": "
        "{\"city\": \"Oslo\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"temp\\\": 3}\""
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 3 C.<|eot_id|>")
    assert trained == "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|eot_id|>It is 3 C.<|eot_id|>"


def test_internlm2_tool_round_trip_exact(tokenizer):
    text, trained = _text_and_trained(tokenizer, "internlm2_chat", ROUND_TRIP)
    bos = tokenizer.bos_token or ""
    assert text == (
        bos + "<|im_start|>system name=<|plugin|>\n" + json.dumps([WEATHER[0]["function"]], indent=4)
        + "\n<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n<|action_start|>"
        "<|plugin|>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|action_end|><|im_end|>\n"
        "<|im_start|>environment name=<|plugin|>\n{\"temp\": 3}<|im_end|>\n<|im_start|>assistant\nIt is 3 C."
        "<|im_end|>")
    assert trained == ("<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"
                       "<|action_end|><|im_end|>It is 3 C.<|im_end|>")


def test_mistral_tool_round_trip_exact(tokenizer):
    text, trained = _text_and_trained(tokenizer, "mistral_v3", ROUND_TRIP)
    call_id = PromptFormat(tokenizer, "mistral_v3").tool_style.call_id("call_1")
    assert len(call_id) == 9 and call_id.isalnum()
    assert text.endswith(
        "[AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": "
        "\"Weather of a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": "
        "\"string\"}}}}}][/AVAILABLE_TOOLS][INST] Weather in Oslo?[/INST][TOOL_CALLS] [{\"name\": \"get_weather\", "
        f"\"arguments\": {{\"city\": \"Oslo\"}}, \"id\": \"{call_id}\"}}]</s>[TOOL_RESULTS] {{\"content\": "
        f"{{\"temp\": 3}}, \"call_id\": \"{call_id}\"}}[/TOOL_RESULTS]It is 3 C.</s>")
    assert trained.startswith("[TOOL_CALLS]") and "TOOL_RESULTS" not in trained


def _published(tokenizer, template: str, turns: list[Turn], tools) -> str:
    messages = []
    for turn in turns:
        messages += ([{"role": "tool", "content": r.content} for r in turn.results]
                     or [{"role": "user", "content": turn.input}])
        msg = {"role": "assistant", "content": turn.output}
        if turn.calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in turn.calls]
        messages.append(msg)
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         enable_thinking=False)


def test_llama31_tool_format_matches_the_published_chat_template(tokenizer):
    """tunelab's text for a tool round trip equals Llama 3.1's own chat template called with tools=."""
    ours = PromptFormat(tokenizer, "llama3_chat").text(ROUND_TRIP)
    theirs = _published(tokenizer, LLAMA31_TOOLS, ROUND_TRIP, WEATHER)
    bos = tokenizer.bos_token or ""
    assert ours.replace(bos, "") == theirs.replace(bos, "")


def test_auto_template_calls_the_tokenizers_own_with_tools(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = LLAMA31_TOOLS
    ids, labels = PromptFormat(tokenizer, "auto").encode(ROUND_TRIP)
    assert tokenizer.decode(ids) == _published(tokenizer, LLAMA31_TOOLS, ROUND_TRIP, WEATHER)
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|eot_id|>It is 3 C.<|eot_id|>"


@pytest.mark.parametrize("template, reply", [
    ("qwen_chat", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    ("llama3_chat", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    ("mistral_v3", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abcdefghi"}]'),
    ("internlm2_chat", 'Let me look.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Oslo"}}'
                       '<|action_end|>'),
    ("auto", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
])
def test_replies_parse_back_into_calls(tokenizer, template, reply):
    fmt = PromptFormat(tokenizer, "qwen_chat")
    fmt.name, fmt.template = template, None if template == "auto" else fmt.template  # parse only needs the name
    content, calls = fmt.parse_reply(reply)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert content in ("", "Let me look.")
    assert fmt.parse_reply("Just text {not json}")[1] == []


# --- 4. bad input: one line naming the record and field, exit 2; or skipped and counted ------------------------
BAD = {
    "arguments": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Oslo}"}}]}], "tools": WEATHER},
        "line 1: message 1: tool_calls[0].function.arguments is not valid JSON"),
    "orphan": ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"},
                             {"role": "assistant", "content": "ok"}], "tools": WEATHER},
               "line 1: message 1: a tool result with no tool call before it"),
    "undeclared": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "send_mail", "arguments": "{}"}}]}], "tools": WEATHER},
        "line 1: message 1: calls tool 'send_mail', which is not declared (the record's tools are get_weather)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_records_are_one_line_errors_or_skipped(case, tmp_path):
    record, expected = BAD[case]
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as err:
        _load(str(f))
    assert str(err.value).startswith(f"{f}: {expected}") and "skip_bad_records" in str(err.value)
    dialogues, stats = _load(str(f), skip_bad_records=True)
    assert len(dialogues) == 1 and stats.skipped == 1 and stats.problems[0].startswith(f"{f}: {expected}")


@pytest.mark.slow
def test_bad_records_exit_2_through_the_cli(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(BAD["arguments"][0]) + "\n")
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path="builtin:tiny-llama", data_path=str(f))
    cp = run_cli("check-custom-dataset", cfg, cwd=tmp_path)
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert cp.returncode == 2 and len(lines) == 1 and "tool_calls[0].function.arguments is not valid JSON" in lines[0]


@pytest.mark.parametrize("entry, expected", [
    ({"path": "a.json", "weight": "high"}, "data_path[0]: 'weight' must be a number above 0"),
    ({"path": "a.json", "count": 2.5}, "data_path[0]: 'count' must be a whole number"),
    ({"path": "a.json", "wieght": 2}, "data_path[0]: unknown key 'wieght' (did you mean 'weight'?)"),
])
@pytest.mark.slow
def test_bad_source_entries_exit_2(entry, expected, tmp_path):
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path="builtin:tiny-llama", data_path=[entry])
    cp = run_cli("check-custom-dataset", cfg, cwd=tmp_path)
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert cp.returncode == 2 and len(lines) == 1 and expected in lines[0], cp.stderr


# --- 3. the variants ------------------------------------------------------------------------------------------------
def test_near_miss_keys_suggest_dataset_columns(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(DataError, match=r"reads as query_response with dataset_columns = \{'question': 'query', "
                                        r"'answer': 'response'\}.*Data formats"):
        _load(str(f))


def test_llamafactory_dataset_info_needs_a_name():
    with pytest.raises(DataError, match="LLaMA-Factory dataset_info.json: set dataset = NAME"):
        _load(str(FIX / "llamafactory"))
    with pytest.raises(DataError, match="no dataset 'glaive_toolcall_demo' \\(did you mean 'glaive_toolcall_en_demo'"):
        _load(str(FIX / "llamafactory"), dataset="glaive_toolcall_demo")


def test_parquet_and_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIX / "openai/tool_calls.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list([{"messages": json.dumps(r["messages"]), "n": i} for i, r in enumerate(rows)])
    plain = datasets.Dataset.from_list([json.loads(x) for x in (FIX / "trl/conversational.jsonl").read_text().splitlines()])
    plain.to_parquet(str(tmp_path / "conv.parquet"))
    plain.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": plain}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in (tmp_path / "conv.parquet", tmp_path / "saved", tmp_path / "saved_dict"):
        dialogues, stats = _load(str(path))
        assert list(stats.formats.values()) == ["openai"] and dialogues[0][1][0].output == "It is blue."
    assert len(table) == 2


# --- 4. mixing ------------------------------------------------------------------------------------------------------
def test_mixing_sources_with_weights_counts_and_their_own_system(tiny_models):
    cfg = _cfg([{"path": str(FIX / "xtuner/openai_sft.jsonl"), "weight": 2, "SYSTEM": "Be brief."},
                {"path": str(FIX / "msswift/pretrain.jsonl"), "count": 1},
                str(FIX / "trl/conversational.jsonl")],
               pretrained_model_name_or_path=str(tiny_models["qwen2"]), prompt_template="qwen_chat")
    tokenizer = load_tokenizer(str(tiny_models["qwen2"]))
    seqs, stats = build_sequences(cfg, tokenizer)
    assert [s.samples for s in stats.sources] == [6, 1, 1] and stats.samples == 8
    summary = stats.summary()
    assert "openai_sft.jsonl: 3 records -> 6 samples, weight 2" in summary
    assert "pretrain.jsonl: 3 records -> 1 samples, count 1" in summary
    texts = [tokenizer.decode(s.input_ids) for s in build_sequences(
        cfg.__class__(**{**cfg.__dict__, "pack_to_max_length": False}), tokenizer)[0]]
    assert sum("system\nBe brief." in t for t in texts) == 6  # the first source's own system text
    assert sum("You are a helpful assistant." in t for t in texts) == 1  # the config default elsewhere


# --- 2/3. pretraining text: whole text trained, packed loss equals the loss alone ---------------------------------
def test_pretraining_text_packed_loss_equals_unpacked(tiny_models):
    from tunelab.model.load import load_model

    path = tiny_models["llama"]
    tokenizer = load_tokenizer(str(path))
    fmt = PromptFormat(tokenizer, "internlm_chat")
    dialogues, _ = _load(str(FIX / "xtuner/pretrain_example_data.jsonl"))
    alone = [s for _, turns in dialogues for s in encode_samples(fmt, turns, 512)[0]]
    for seq in alone:  # no template; every next token trained, the eos ends the document
        assert seq.input_ids[-1] == tokenizer.eos_token_id and seq.n_targets == len(seq) - 1
        assert "<|User|>" not in tokenizer.decode(seq.input_ids)
    packed = pack(alone, 512)
    assert len(packed) == 1
    assert_packed_equals_alone(load_model(str(path), dtype=torch.float32).eval(), packed, alone,
                               tokenizer.pad_token_id)


def test_long_documents_are_cut_into_pieces_not_truncated(tokenizer):
    fmt = PromptFormat(tokenizer, "qwen_chat")
    doc = [Turn("", "word " * 200, document=True)]
    pieces, truncated = encode_samples(fmt, doc, 64)
    total = len(fmt.encode(doc)[0])
    assert not truncated and sum(len(p) for p in pieces) == total and all(len(p) <= 64 for p in pieces)
