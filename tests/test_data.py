"""Data: every supported format on real files, detection, exact masking, folders, the auto template."""
from __future__ import annotations

import json

import pytest

from tunelab.config.loader import load_config
from tunelab.data.dataset import DataStats, build_sequences, load_dialogues
from tunelab.data.encode import IGNORE, PromptFormat
from tunelab.data.formats import Turn, detect_format, to_turns
from tunelab.data.loading import read_records, resolve_data_files
from tunelab.errors import DataError
from tunelab.model.load import load_tokenizer


def _cfg(data_path, **over):
    values = dict(pretrained_model_name_or_path="m", data_path=data_path, **over)
    cfg, _ = load_config("demo", [f"{k}={v!r}" for k, v in values.items()])
    return cfg


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


@pytest.mark.parametrize("rel,fmt,count", [
    ("self_cognition/personal_assistant.json", "conversation", 4),
    ("medqa2019/MedQA2019-structured-train.jsonl", "conversation", 482),  # a JSON array named .jsonl
    ("xtuner_toy/toy_custom_multi_turn_data.json", "conversation", 2),
    ("alpaca/alpaca_data_first102.json", "alpaca", 102),
    ("sharegpt/dummy_conversation_with_system.json", "sharegpt", 500),
    ("self_cognition/ms_swift_self_cognition.jsonl", "query_response", 134),
])
def test_real_files_load_with_detected_format(data_dir, rel, fmt, count):
    stats = DataStats()
    # the ms-swift file's {{NAME}}/{{AUTHOR}} must be filled (an unfilled placeholder is an error)
    dialogues = load_dialogues(_cfg(str(data_dir / rel), data_placeholders={"NAME": "N", "AUTHOR": "A"}), stats)
    assert stats.formats == {str(data_dir / rel): fmt}
    assert stats.records == count and len(dialogues) == count - stats.skipped
    assert all(any(t.output for t in turns) for _, turns in dialogues)


def test_record_lines_in_a_json_array(data_dir):
    records = read_records(str(data_dir / "self_cognition" / "personal_assistant.json"))
    assert [r.line for r in records] == [2, 10, 18, 26]


def test_alpaca_joins_instruction_and_input(data_dir):
    records = read_records(str(data_dir / "alpaca" / "alpaca_data_first102.json"))
    with_input = next(r.value for r in records if r.value["input"])
    (turn,) = to_turns(with_input, "alpaca")
    assert turn.input == f"{with_input['instruction']}\n{with_input['input']}" and turn.output == with_input["output"]


def test_openai_messages_and_bare_lists():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                        {"role": "assistant", "content": "A2"}]}
    assert detect_format(rec, "x") == "openai"
    assert to_turns(rec, "openai") == [Turn("Q1", "A1", "S"), Turn("Q2", "A2")]
    assert detect_format(rec["messages"], "x") == "openai"
    assert to_turns(rec["messages"], "openai") == [Turn("Q1", "A1", "S"), Turn("Q2", "A2")]


def test_guanaco_text():
    rec = {"text": "### Human: How do I bake bread?### Assistant: Mix flour and water.### Human: Then?"
                   "### Assistant: Bake it."}
    assert detect_format(rec, "x") == "guanaco"
    assert to_turns(rec, "guanaco") == [Turn("How do I bake bread?", "Mix flour and water."), Turn("Then?", "Bake it.")]


def test_sharegpt_system_turn(data_dir):
    rec = read_records(str(data_dir / "sharegpt" / "dummy_conversation_with_system.json"))[0].value
    turns = to_turns(rec, "sharegpt")
    assert turns[0].system == rec["system"] and turns[0].input == "Who are you?"
    assert len(turns) == 2 and turns[1] == Turn("Have a nice day!", "You too!")
    inline = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}]}
    assert to_turns(inline, "sharegpt") == [Turn("Q", "A", "S")]


def test_unrecognised_format_names_keys(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl: line 1: unrecognised record format \(keys: answer, question\)"):
        load_dialogues(_cfg(str(f)), DataStats())


def test_skip_bad_records_counts(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"conversation": [{"input": "q", "output": "a"}]},
        {"conversation": [{"input": "q", "output": ""}]},
        {"conversation": [{"input": "q"}]}]) + "\n")
    with pytest.raises(DataError, match="line 2: no trainable output"):
        load_dialogues(_cfg(str(f)), DataStats())
    stats = DataStats()
    assert len(load_dialogues(_cfg(str(f), skip_bad_records=True), stats)) == 1 and stats.skipped == 2


def test_folder_takes_train_files(tmp_path):
    row = json.dumps({"text": "### Human: hi### Assistant: hello"})
    for name in ("openassistant_best_replies_train.jsonl", "openassistant_best_replies_eval.jsonl"):
        (tmp_path / name).write_text(row + "\n")
    assert resolve_data_files(str(tmp_path)) == [str(tmp_path / "openassistant_best_replies_train.jsonl")]


def test_internlm_chat_masking_is_exact(tokenizer):
    """Only outputs and their end-of-turn marker are trained; prompt, system and separators are masked."""
    fmt = PromptFormat(tokenizer, "internlm_chat", system="Be brief.")
    ids, labels = fmt.encode([Turn("Hi", "Hello!"), Turn("Bye", "Goodbye.")])
    assert tokenizer.decode(ids) == ("<s><|System|>:Be brief.\n<|User|>:Hi<eoh>\n<|Bot|>:Hello!<eoa>"
                                     "\n<|User|>:Bye<eoh>\n<|Bot|>:Goodbye.<eoa>")
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert trained == "Hello!<eoa>Goodbye.<eoa>"
    prompt, _ = fmt.encode([Turn("Hi", "")], open_last=True)
    assert tokenizer.decode(prompt) == "<s><|System|>:Be brief.\n<|User|>:Hi<eoh>\n<|Bot|>:"


def test_template_without_suffix_trains_eos(tokenizer):
    fmt = PromptFormat(tokenizer, "default")
    ids, labels = fmt.encode([Turn("Hi", "Hello!")])
    assert [t for t, l in zip(ids, labels) if l != IGNORE][-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token in fmt.stop_words


def test_auto_template_matches_named_template(tokenizer):
    """The tiny tokenizer carries llama2_chat as its chat_template: 'auto' must give identical ids and masks."""
    turns = [Turn("Hi", "Hello!", "Be brief."), Turn("Bye", "Goodbye.")]
    auto = PromptFormat(tokenizer, "auto").encode(turns)
    named = PromptFormat(tokenizer, "llama2_chat").encode(turns)
    assert auto == named


def test_truncation_is_counted(data_dir, tokenizer):
    cfg = _cfg(str(data_dir / "alpaca" / "alpaca_data_first102.json"), max_length=64, pack_to_max_length=False)
    seqs, stats = build_sequences(cfg, tokenizer)
    assert stats.truncated > 0 and all(len(s) <= 64 for s in seqs)
    assert stats.samples + stats.skipped == stats.records


# -- dataset_columns: the catalogue's hub datasets, in their published column layouts ---------------------

HUB_ROWS = {  # dataset key -> {data_path entry: one record with that dataset's columns}
    "code_alpaca": {"HuggingFaceH4/CodeAlpaca_20K": {"prompt": "Add two numbers.", "completion": "a + b"}},
    "sql": {"b-mc2/sql-create-context": {"question": "How many heads?", "context": "CREATE TABLE head (age INTEGER)",
                                         "answer": "SELECT COUNT(*) FROM head"}},
    "colorist": {"burkelibbey/colors": {"color": "#87ceeb", "description": "sky blue"}},
    "arxiv_gentitle": {"./data/arxiv_data.json": {"id": "0704.0001", "authors": "A", "title": "A Title",
                                                   "abstract": "We study things."}},
    "openorca": {"Open-Orca/OpenOrca": {"id": "niv.1", "system_prompt": "Be careful.", "question": "2+2?",
                                        "response": "4"}},
    "lawyer": {"./data/CrimeKgAssitant清洗后_52k.json": {"input": "盗窃罪怎么判？", "output": "视数额而定。"},
               "./data/训练数据_带法律依据_92k.json": {"question": "离婚要什么材料？", "answer": "身份证和结婚证。",
                                                  "reference": ["民法典"]}},
    "alpaca_zh": {"silk-road/alpaca-data-gpt4-chinese": {
        "instruction": "Say hi.", "input": "", "output": "Hi.",
        "instruction_zh": "打个招呼。", "input_zh": "", "output_zh": "你好。"}},
    "alpaca_enzh": {"tatsu-lab/alpaca": {"instruction": "Say hi.", "input": "", "output": "Hi."},
                    "silk-road/alpaca-data-gpt4-chinese": {
                        "instruction": "Say bye.", "input": "", "output": "Bye.",
                        "instruction_zh": "说再见。", "input_zh": "", "output_zh": "再见。"}},
}
EXPECTED_TURNS = {
    "code_alpaca": [("Add two numbers.", "a + b", "")],
    "sql": [("CREATE TABLE head (age INTEGER)\nHow many heads?", "SELECT COUNT(*) FROM head", "")],
    "colorist": [("sky blue", "#87ceeb", "")],
    "arxiv_gentitle": [("We study things.", "A Title", "")],
    "openorca": [("2+2?", "4", "Be careful.")],
    "lawyer": [("盗窃罪怎么判？", "视数额而定。", ""), ("离婚要什么材料？", "身份证和结婚证。", "")],
    "alpaca_zh": [("打个招呼。", "你好。", "")],
    "alpaca_enzh": [("Say hi.", "Hi.", ""), ("说再见。", "再见。", "")],
}


@pytest.mark.parametrize("dataset", sorted(HUB_ROWS))
def test_catalogue_column_mappings(dataset, tmp_path, monkeypatch):
    """Each built-in dataset's columns (saved locally under the config's own data_path names) map to the
    turns XTuner's map functions make: the right question, answer and system, the Chinese side of silk-road."""
    from tunelab.config.catalogue import BUILTIN
    monkeypatch.chdir(tmp_path)
    for entry, row in HUB_ROWS[dataset].items():
        path = tmp_path / entry if entry.endswith(".json") else tmp_path / entry / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    name = next(n for n in BUILTIN if f"_qlora_{dataset}_e" in n)
    cfg = load_config(name)[0]
    got = [[(t.input, t.output, t.system) for t in turns] for _, turns in load_dialogues(cfg, DataStats())]
    assert [turns[0] for turns in got] == EXPECTED_TURNS[dataset]


def test_dataset_columns_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    stats = DataStats()
    assert load_dialogues(_cfg(str(f), dataset_columns={"prompt": "query", "completion": "response"}), stats)
    assert stats.formats[str(f)] == "query_response"
    with pytest.raises(DataError, match=r"x.jsonl: line 1: dataset_columns maps 'promt', but the record has no such "
                                        r"field \(fields: prompt, completion\)"):
        load_dialogues(_cfg(str(f), dataset_columns={"promt": "query"}), DataStats())
    from tunelab.errors import ConfigError
    with pytest.raises(ConfigError, match="'dataset_columns' has an entry for 'y.jsonl', which is not in data_path"):
        _cfg(str(f), dataset_columns={"y.jsonl": {"a": "b"}})
    with pytest.raises(ConfigError, match="'dataset_columns' must map column -> field names"):
        _cfg(str(f), dataset_columns={"a": "b", "c": {"d": "e"}})
