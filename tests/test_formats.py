"""Data formats on the real files: detection of every file, the exact rendered and trained text per format
(expected strings written out by reading the records), placeholders, bad data through the CLI, and the
check-custom-dataset / log-dataset reports."""
from __future__ import annotations

import ast
import json

import pytest

from conftest import run_cli, write_config
from tunelab.config.loader import load_config
from tunelab.data.dataset import DataStats, load_dialogues
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.formats import Filtered, Turn, detect_format, group_oasst_messages, to_turns
from tunelab.data.inspect import check_dataset, masked_text
from tunelab.data.loading import read_records
from tunelab.errors import DataError
from tunelab.model.load import load_tokenizer

NAMES = {"NAME": "Tuney", "AUTHOR": "Ada"}
FILES = {  # every .json/.jsonl file under shared/data -> (format, records)
    "alpaca/alpaca_data_cleaned_1000.json": ("alpaca", 1000),
    "alpaca/alpaca_data_first102.json": ("alpaca", 102),
    "medqa2019/MedQA2019-structured-test.jsonl": ("conversation", 208),
    "medqa2019/MedQA2019-structured-train.jsonl": ("conversation", 482),
    "msagent/msagent_doc_samples.jsonl": ("msagent", 2),
    "oasst/en_100_message.jsonl": ("oasst", 100),
    "oasst/en_100_tree.jsonl": ("oasst", 100),
    "self_cognition/ms_swift_self_cognition.jsonl": ("query_response", 134),
    "self_cognition/personal_assistant.json": ("conversation", 4),
    "sharegpt/dummy_conversation.json": ("sharegpt", 500),
    "sharegpt/dummy_conversation_with_system.json": ("sharegpt", 500),
    "xtuner_toy/toy_custom_incremental_data.json": ("conversation", 2),
    "xtuner_toy/toy_custom_multi_turn_data.json": ("conversation", 2),
    "xtuner_toy/toy_custom_single_turn_data.json": ("conversation", 2),
}


def _cfg(data_path, **over):
    values = {"pretrained_model_name_or_path": "m", "data_path": str(data_path), **over}
    cfg, _ = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return cfg


def _dialogues(path, **over):
    stats = DataStats()
    return load_dialogues(_cfg(path, **over), stats), stats


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


def _texts(tokenizer, turns):
    """(full decoded text, decoded trained-only tokens) with internlm_chat and no config SYSTEM."""
    ids, labels = PromptFormat(tokenizer, "internlm_chat").encode(turns)
    return tokenizer.decode(ids), tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def _one_error_line(cp) -> str:
    assert cp.returncode == 2, (cp.returncode, cp.stderr[-2000:])
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    return lines[0]


# --- every real file ------------------------------------------------------------------------------------
def test_the_table_covers_every_data_file(data_dir):
    found = {str(p.relative_to(data_dir)) for ext in ("*.json", "*.jsonl") for p in data_dir.rglob(ext)}
    assert found == set(FILES)


@pytest.mark.parametrize("rel", sorted(FILES))
def test_every_real_file_loads_with_its_format(data_dir, rel):
    fmt, count = FILES[rel]
    dialogues, stats = _dialogues(data_dir / rel, data_placeholders=NAMES)
    assert stats.formats == {str(data_dir / rel): fmt}
    assert stats.records == count == len(dialogues) and stats.skipped == stats.filtered == 0
    assert all(any(t.output.strip() for t in turns) for _, turns in dialogues)
    assert not any("{{NAME}}" in t.output or "{{AUTHOR}}" in t.output for _, turns in dialogues for t in turns)


@pytest.mark.slow
def test_check_custom_dataset_on_every_real_file(data_dir, tiny_llama, tmp_path):
    paths = [str(data_dir / rel) for rel in sorted(FILES)]
    cfg = write_config(tmp_path / "c.py", pretrained_model_name_or_path=str(tiny_llama),
                       prompt_template="internlm_chat", data_path=paths, data_placeholders=NAMES)
    cp = run_cli("check-custom-dataset", cfg, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-2000:]
    for rel, path in zip(sorted(FILES), paths):
        fmt, count = FILES[rel]
        assert f"{path}: format {fmt}, {count} records ({count} usable, 0 bad and skipped, 0 filtered out)" in cp.stdout
    total = sum(c for _, c in FILES.values())
    assert f"total: {total} records in {len(FILES)} file(s); {total} usable" in cp.stdout
    assert "tokens per sample (before truncation): min " in cp.stdout and "packed sequences: " in cp.stdout


# --- exact text per format ------------------------------------------------------------------------------
def test_conversation_exact(data_dir, tokenizer):
    (where, turns), *_ = _dialogues(data_dir / "self_cognition" / "personal_assistant.json")[0]
    answer = "我是不要葱姜蒜大佬的小助手，内在是上海AI实验室书生·浦语的7B大模型哦"
    assert where.endswith("personal_assistant.json: line 2")
    assert _texts(tokenizer, turns) == (f"<s><|User|>:请介绍一下你自己<eoh>\n<|Bot|>:{answer}<eoa>", f"{answer}<eoa>")


def test_alpaca_exact(data_dir, tokenizer):
    dialogues, _ = _dialogues(data_dir / "alpaca" / "alpaca_data_first102.json")
    assert _texts(tokenizer, dialogues[5][1]) == (
        "<s><|User|>:Identify the odd one out.\nTwitter, Instagram, Telegram<eoh>\n<|Bot|>:Telegram<eoa>",
        "Telegram<eoa>")


def test_sharegpt_exact(data_dir, tokenizer):
    dialogues, _ = _dialogues(data_dir / "sharegpt" / "dummy_conversation_with_system.json")
    answer = "I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS)."
    assert _texts(tokenizer, dialogues[0][1]) == (
        "<s><|System|>:A chat between a curious user and an artificial intelligence assistant whose name is "
        "Vicuna. The assistant gives helpful, detailed, and polite answers to the user's questions.\n"
        f"<|User|>:Who are you?<eoh>\n<|Bot|>:{answer}<eoa>\n<|User|>:Have a nice day!<eoh>\n<|Bot|>:You too!<eoa>",
        f"{answer}<eoa>You too!<eoa>")


def test_openai_exact_dict_and_bare_list(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    f = tmp_path / "o.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps(messages) + "\n", encoding="utf-8")
    dialogues, stats = _dialogues(f)
    assert stats.formats[str(f)] == "openai" and dialogues[0][1] == dialogues[1][1]
    assert _texts(tokenizer, dialogues[0][1]) == (
        "<s><|System|>:Be brief.\n<|User|>:2+2?<eoh>\n<|Bot|>:4<eoa>\n<|User|>:3+3?<eoh>\n<|Bot|>:6<eoa>", "4<eoa>6<eoa>")


def test_guanaco_exact(tmp_path, tokenizer):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"text": "### Human: Name a colour.### Assistant: Blue.### Human: Another?### "
                                     "Assistant: Red."}) + "\n", encoding="utf-8")
    dialogues, stats = _dialogues(f)
    assert stats.formats[str(f)] == "guanaco"
    assert _texts(tokenizer, dialogues[0][1]) == (
        "<s><|User|>:Name a colour.<eoh>\n<|Bot|>:Blue.<eoa>\n<|User|>:Another?<eoh>\n<|Bot|>:Red.<eoa>",
        "Blue.<eoa>Red.<eoa>")


def test_text_exact(tmp_path, tokenizer):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "Plain text to continue pre-training on."}) + "\n", encoding="utf-8")
    dialogues, stats = _dialogues(f)
    assert stats.formats[str(f)] == "text" and dialogues[0][1] == [Turn("", "Plain text to continue pre-training on.", document=True)]
    # pretraining text: no template, the whole text and the eos after it trained
    assert _texts(tokenizer, dialogues[0][1]) == ("Plain text to continue pre-training on.</s>",
                                                  "Plain text to continue pre-training on.</s>")


def test_query_response_exact_with_placeholders(data_dir, tokenizer):
    dialogues, _ = _dialogues(data_dir / "self_cognition" / "ms_swift_self_cognition.jsonl", data_placeholders=NAMES)
    answer = "我是Tuney，由Ada训练的。我的目的是提供有用、准确和及时的信息，并帮助用户以各种方式进行有效沟通。"
    assert _texts(tokenizer, dialogues[0][1]) == (f"<s><|User|>:你是？<eoh>\n<|Bot|>:{answer}<eoa>", f"{answer}<eoa>")


MSAGENT_CALL = ('Action: modelscope_text-ie\nAction Input: {"text": "近日，美国政府宣布将对中国1000多种商品加征关税，'
                '并威胁进一步加征关税。", "schema": "{\\"人物\\": null, \\"地理位置\\": null, \\"组织机构\\": null}"}')
MSAGENT_FINAL = 'Final Answer: 信息抽取结果：{"人物": [], "地理位置": ["中国", "美国"], "组织机构": []}。'


def test_msagent_bench_record_exact(data_dir, tokenizer):
    dialogues, _ = _dialogues(data_dir / "msagent" / "msagent_doc_samples.jsonl")
    full, trained = _texts(tokenizer, dialogues[0][1])
    assert full == (
        "<s><|System|>:你是达摩院xxxx\n"
        '<|User|>:按照给定的schema抽取出下面文本对应的信息\nschema：{"人物": null, "地理位置": null, "组织机构": null}\n'
        "近日，美国政府宣布将对中国1000多种商品加征关税，并威胁进一步加征关税。<eoh>\n"
        f"<|Bot|>:{MSAGENT_CALL}<eoa>\n"
        '<|User|>:Response: {"人物": [], "地理位置": ["中国", "美国"], "组织机构": []}<eoh>\n'
        f"<|Bot|>:{MSAGENT_FINAL}<eoa>")
    assert trained == f"{MSAGENT_CALL}<eoa>{MSAGENT_FINAL}<eoa>"  # the tool result is never trained


def test_msagent_react_text_record(data_dir, tokenizer):
    """ms-swift's ms_agent record is already ReAct text: kept verbatim, cut at each Observation (masked)."""
    dialogues, _ = _dialogues(data_dir / "msagent" / "msagent_doc_samples.jsonl")
    turns = dialogues[1][1]
    assert len(turns) == 6 and turns[0].system.startswith("Answer the following questions as best you can.")
    assert turns[0].input == "你好，请问你们有哪些手机可以推荐？"
    assert turns[0].output == "Action: hm_product_recommend\nAction Input: {'keywords_dict': {'商品类目': '手机'}}"
    assert turns[1].input.startswith("Observation: [{'sku_code': '10518244314', 'product_name': '小米11 Ultra")
    assert turns[4] == Turn("小米11 Ultra拍照性能怎么样？", "Action: hm_product_info\nAction Input: {'sku_code_list': "
                            "['15956662254'], 'sku_name_list': ['小米11 Ultra 5G手机 256GB'], 'property_list': [['拍照性能']]}")
    assert turns[5] == Turn(
        "Observation: [{'sku_code': '15956662254', 'property': {'拍照性能': '小米11 Ultra 5G手机配备了1亿像素的主摄像头，"
        "还有120X超长焦电影摄像头，以及20MP超广角摄像头等组合，拍照性能非常出色。'}}]",
        "Thought: I now know the final answer\nFinal Answer: 小米11 Ultra 5G手机配备了1亿像素的主摄像头，还有120X超长焦"
        "电影摄像头，以及20MP超广角摄像头等组合，拍照性能非常出色。如果您还有其他问题或需求，请随时告诉我。")
    _, trained = _texts(tokenizer, turns)
    assert "Observation" not in trained and "sku_code': '15956662254', 'property'" not in trained
    assert trained.count("<eoa>") == 6 and trained.startswith("Action: hm_product_recommend\n")


def test_msagent_thoughts_several_calls_and_plain_replies():
    call = '<|startofthink|>```JSON\n{"api_name": "%s", "url": "http://x", "parameters": {"q": "%s"}}\n```<|endofthink|>'
    result = "<|startofexec|>```JSON\n%s\n```<|endofexec|>"
    rec = {"conversations": [
        {"from": "user", "value": "Weather in Paris and Rome?"},
        {"from": "assistant", "value": "First Paris." + call % ("weather", "Paris") + result % "sunny"
         + "Now Rome." + call % ("weather", "Rome") + result % "rain" + "\nParis is sunny, Rome rainy."},
        {"from": "user", "value": "Thanks"}, {"from": "assistant", "value": "You are welcome."}]}
    assert detect_format(rec, "x") == "msagent"
    assert to_turns(rec, "msagent") == [
        Turn("Weather in Paris and Rome?", 'Thought: First Paris.\nAction: weather\nAction Input: {"q": "Paris"}'),
        Turn("Response: sunny", 'Thought: Now Rome.\nAction: weather\nAction Input: {"q": "Rome"}'),
        Turn("Response: rain", "Final Answer: Paris is sunny, Rome rainy."),
        Turn("Thanks", "Final Answer: You are welcome.")]
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert detect_format(sharegpt, "x") == "sharegpt"


OASST_TURNS = [  # en_100_tree.jsonl / en_100_message.jsonl line 65, along the rank-0 replies
    Turn("How do I output a string in C++ programming?",
         "You can output strings in many ways one of the simplest methods is :\n```cout << string```"),
    Turn("Can you extend the example so that I can copy it into a text file and run it?",
         "Sure, here's an example:\n```\n#include <iostream>\n#include <string>\n\nint main() {\n  std::string str = "
         "\"Hello, World!\";\n  std::cout << str << std::endl;\n  return 0;\n}\n```\nSave the code to a file with a "
         "`.cpp` extension, then compile and run it using a C++ compiler.")]  # its unanswered last prompt is dropped


@pytest.mark.parametrize("name", ["en_100_tree.jsonl", "en_100_message.jsonl"])
def test_oasst_exact(data_dir, tokenizer, name):
    dialogues, _ = _dialogues(data_dir / "oasst" / name)
    where, turns = dialogues[64]
    assert where.endswith(f"{name}: line 65") and turns == OASST_TURNS
    full, trained = _texts(tokenizer, turns)
    assert full == (f"<s><|User|>:{OASST_TURNS[0].input}<eoh>\n<|Bot|>:{OASST_TURNS[0].output}<eoa>\n"
                    f"<|User|>:{OASST_TURNS[1].input}<eoh>\n<|Bot|>:{OASST_TURNS[1].output}<eoa>")
    assert trained == f"{OASST_TURNS[0].output}<eoa>{OASST_TURNS[1].output}<eoa>"


def test_oasst_flat_message_list_groups_into_the_same_tree(data_dir, tmp_path):
    """The official message-list export: one message per line, linked by parent_id, in any order."""
    root = read_records(str(data_dir / "oasst" / "en_100_message.jsonl"))[64].value
    flat = []

    def walk(msg):
        flat.append({k: v for k, v in msg.items() if k != "replies"})
        for reply in msg["replies"]:
            walk(reply)
    walk(root)
    orphan = {"message_id": "o1", "parent_id": "gone", "role": "assistant", "text": "?", "replies": []}
    f = tmp_path / "messages.jsonl"
    f.write_text("".join(json.dumps(m) + "\n" for m in flat[::-1] + [orphan]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{f}: line {len(flat) + 1}: its parent message gone is not in the file"):
        _dialogues(f)
    dialogues, stats = _dialogues(f, skip_bad_records=True)
    assert stats.records == 2 and stats.skipped == 1 and len(dialogues) == 1
    assert dialogues[0] == (f"{f}: line {len(flat)}", OASST_TURNS)  # keyed by the root's line


def test_oasst_ranks_deleted_and_failed_review():
    def msg(mid, role, text, rank=None, replies=(), **extra):
        return {"message_id": mid, "role": role, "text": text, "rank": rank, "replies": list(replies), **extra}
    tree = {"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": msg("p", "prompter", "Q", replies=[
        msg("a0", "assistant", "deleted best", 0, deleted=True),
        msg("a1", "assistant", "failed review", 1, review_result=False),
        msg("a2", "assistant", "no rank"),
        msg("a3", "assistant", "rank 3, first", 3, [msg("q2", "prompter", "Q2", replies=[
            msg("b1", "assistant", "no rank, first"), msg("b2", "assistant", "no rank, second")])]),
        msg("a4", "assistant", "rank 3, second", 3)])}
    assert to_turns(tree, "oasst") == [Turn("Q", "rank 3, first"), Turn("Q2", "no rank, first")]
    assert group_oasst_messages([]) == []
    for bad in ({**tree, "tree_state": "aborted_low_grade"}, {**tree, "prompt": {**tree["prompt"], "deleted": True}},
                {**tree, "prompt": msg("p", "prompter", "Q")}):
        with pytest.raises(Filtered):
            to_turns(bad, "oasst")


# --- placeholders, mixed files, overrides ---------------------------------------------------------------
def test_placeholders_fill_every_text_and_leave_code_alone(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"conversation": [{"system": "You are {{NAME}}.", "input": "Who made {{NAME}}?",
                                               "output": "{{AUTHOR}}. In Vue: {{msg}}"}]}) + "\n", encoding="utf-8")
    dialogues, _ = _dialogues(f, data_placeholders=NAMES)
    assert dialogues[0][1] == [Turn("Who made Tuney?", "Ada. In Vue: {{msg}}", "You are Tuney.")]


def test_dataset_format_overrides_detection_and_the_mixed_check(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"text": "Some prose."}) + "\n" + json.dumps({"text": "### Human: hi### Assistant: yo"})
                 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: this record looks like guanaco but the file's first record is text"):
        _dialogues(f)
    dialogues, stats = _dialogues(f, dataset_format="text")
    assert stats.formats[str(f)] == "text" and dialogues[1][1] == [Turn("", "### Human: hi### Assistant: yo", document=True)]


# --- bad data through the CLI ---------------------------------------------------------------------------
@pytest.fixture()
def base(tiny_llama):
    return {"pretrained_model_name_or_path": str(tiny_llama), "prompt_template": "internlm_chat"}


def test_cli_unknown_dataset_format_lists_formats(base, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.py", **base, data_path=str(data_dir / "alpaca"), dataset_format="sharegtp")
    line = _one_error_line(run_cli("check-custom-dataset", cfg, cwd=tmp_path))
    assert "'dataset_format': unknown format 'sharegtp' (did you mean 'sharegpt'?)" in line
    assert "valid: auto, conversation, openai, msagent, sharegpt, glaive, alpaca, query_response, oasst, guanaco, text" in line


def test_cli_mixed_formats(base, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n"
                 + json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
                 + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **base, data_path=str(f))
    line = _one_error_line(run_cli("check-custom-dataset", cfg, cwd=tmp_path))
    assert line == (f"tunelab: error: {f}: line 2: this record looks like sharegpt but the file's first record is "
                    f"alpaca; split the file or set dataset_format")


def test_cli_no_usable_records(base, tmp_path):
    f = tmp_path / "empty_outputs.jsonl"
    f.write_text("".join(json.dumps({"conversation": [{"input": f"q{i}", "output": ""}]}) + "\n" for i in range(3)),
                 encoding="utf-8")
    cfg = write_config(tmp_path / "c.py", **base, data_path=str(f), skip_bad_records=True)
    line = _one_error_line(run_cli("check-custom-dataset", cfg, cwd=tmp_path))
    assert line.startswith(f"tunelab: error: {f}: no usable records (3 bad and skipped, 0 filtered out; "
                           f"first: {f}: line 1: no trainable output")
    assert line.endswith("fix the records or remove the file from data_path")


def test_cli_unfilled_placeholder(base, data_dir, tmp_path):
    f = data_dir / "self_cognition" / "ms_swift_self_cognition.jsonl"
    cfg = write_config(tmp_path / "c.py", **base, data_path=str(f), data_placeholders={"AUTHOR": "Ada"})
    line = _one_error_line(run_cli("check-custom-dataset", cfg, cwd=tmp_path))
    assert line == (f"tunelab: error: {f}: line 1: placeholder {{{{NAME}}}} has no value; "
                    f"set data_placeholders = {{'NAME': ...}} in the config")


# --- reports ----------------------------------------------------------------------------------------------
def test_check_dataset_counts_skips_truncation_and_drops(tiny_llama, tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"conversation": [{"input": "hi", "output": "hello"}, {"input": "more", "output": ""}]},
            {"conversation": [{"input": "q"}]},  # bad: no output
            {"conversation": [{"input": "x " * 200, "output": "too late"}]}]  # answer beyond max_length
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = _cfg(f, pretrained_model_name_or_path=str(tiny_llama), prompt_template="internlm_chat",
               max_length=64, skip_bad_records=True)
    report = check_dataset(cfg, lambda cfg: load_tokenizer(str(tiny_llama)))
    assert f"{f}: format conversation, 3 records (2 usable, 1 bad and skipped, 0 filtered out)" in report
    assert ("samples: 1 kept, 1 truncated (longer than max_length=64), 1 dropped (no answer token within "
            "max_length), 1 empty outputs") in report
    assert "packed sequences: 1 of at most 64 tokens" in report
    assert f"{f}: line 2: conversation[0]: missing 'output'" in report


def test_masked_text_rendering(tokenizer):
    ids, labels = PromptFormat(tokenizer, "internlm_chat").encode([Turn("Hi", "Hello!"), Turn("Bye", "Ciao.")])
    assert masked_text(tokenizer, ids, labels) == "[...]Hello!<eoa>[...]Ciao.<eoa>"


@pytest.mark.slow
def test_cli_log_dataset(base, data_dir, tmp_path, tokenizer):
    f = data_dir / "self_cognition" / "personal_assistant.json"
    cfg = write_config(tmp_path / "c.py", **base, data_path=str(f))
    answer = "我是不要葱姜蒜大佬的小助手，内在是上海AI实验室书生·浦语的7B大模型哦"
    cp = run_cli("log-dataset", cfg, "--show", "masked_text", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0].startswith(f"first sample: {f}: line 2 (format conversation, ")
    assert lines[1:] == ["--- masked_text (trained text as is; [...] = untrained tokens) ---", f"[...]{answer}<eoa>"]
    cp = run_cli("log-dataset", cfg, "--show", "all", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout.split("\n--- ")
    assert out[1] == f"text ---\n<s><|User|>:请介绍一下你自己<eoh>\n<|Bot|>:{answer}<eoa>"
    assert out[2] == f"masked_text (trained text as is; [...] = untrained tokens) ---\n[...]{answer}<eoa>"
    ids = ast.literal_eval(out[3].removeprefix("input_ids ---\n"))
    labels = ast.literal_eval(out[4].removeprefix("labels (-100 = not trained) ---\n").strip())
    assert f"{len(ids)} tokens, not truncated)" in out[0] and len(labels) == len(ids)
    assert tokenizer.decode(ids) == f"<s><|User|>:请介绍一下你自己<eoh>\n<|Bot|>:{answer}<eoa>"
    assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids))
    assert tokenizer.decode([lab for lab in labels if lab != IGNORE]) == f"{answer}<eoa>"
