"""`tunelab chat --lagent` and `--with-plugins` with a tiny model trained (through the real CLI) on MSAgent-style
ReAct traces that call the calculator: the agent runs the tool, feeds the result back, and the model's final
answer carries it. Also: stop words, the trained template and system by default, search results in context,
tool errors fed back, the step limit, and the chat flags."""
from __future__ import annotations

import json
import random

import pytest

from conftest import run_cli, write_config
from test_tools import serper  # noqa: F401  (the local Serper-shaped server fixture)

AGENT_SYSTEM = "You can call calculate and search."
PLUGIN_SYSTEM = "Plugins: Calculate."
HELD_OUT = [(356, 239), (408, 535)]  # questions never seen in training
SEARCH_QUESTION = "Search the web for tunelab."
N_CALC = 1500


def _fits(a: int, b: int) -> bool:
    """Numbers that the tiny byte-level tokenizer splits into one token per digit wherever they stand (it has
    merges for ' 1', ' 2', ' 7' and '84'), with 3-digit sums: copying a result is then a fixed-offset lookup,
    which a 2-layer model learns in a few hundred steps."""
    s = str(a + b)
    return len(s) == 3 and s[0] not in "127" and str(a)[0] not in "127" and "84" not in f"{a}+{b}={s}"


def _questions(n: int) -> list[tuple[int, int]]:
    """n distinct additions of two 3-digit numbers: too many to memorise, so the model must copy the result."""
    rng, seen = random.Random(0), set(HELD_OUT)
    out = []
    while len(out) < n:
        a, b = rng.randint(300, 699), rng.randint(100, 599)
        if _fits(a, b) and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def _call(api: str, parameters: dict, result: str, after: str) -> str:
    """An MSAgent-Bench assistant message: tool call in <|startofthink|>, result in <|startofexec|>."""
    call = {"api_name": api, "url": "http://127.0.0.1:5000/" + api, "parameters": parameters}
    return (f"<|startofthink|>```JSON\n{json.dumps(call)}\n```<|endofthink|>\n\n"
            f"<|startofexec|>```JSON\n{result}\n```<|endofexec|>\n{after}")


def _write_data(folder) -> list:
    with open(folder / "react.jsonl", "w", encoding="utf-8") as f:
        for i, (a, b) in enumerate(_questions(N_CALC)):
            said = _call("calculate", {"expression": f"{a}+{b}"}, str(a + b), str(a + b))
            f.write(json.dumps({"id": f"calc_{i}", "conversations": [
                {"from": "user", "value": f"What is {a}+{b}?"}, {"from": "assistant", "value": said}]}) + "\n")
        for i in range(20):
            said = _call("search", {"query": "tunelab"}, "1. tunelab: a toolkit", "Found it.")
            f.write(json.dumps({"id": f"search_{i}", "conversations": [
                {"from": "user", "value": SEARCH_QUESTION}, {"from": "assistant", "value": said}]}) + "\n")
    text = (folder / "react.jsonl").read_text(encoding="utf-8")
    assert not any(f"What is {a}+{b}?" in text for a, b in HELD_OUT)  # the test questions are new
    plugin = {"conversation": [{"system": PLUGIN_SYSTEM, "input": "Use the calculator on 64*5.",
                                "output": 'Calculate("64*5")<eoc>\n<|Results|>:\nCalculate("64*5") => 320\n'
                                          '<eor>\nIt is 320.'}]}
    (folder / "plugins.json").write_text(json.dumps([plugin] * 20), encoding="utf-8")
    return [str(folder / "react.jsonl"), str(folder / "plugins.json")]


@pytest.fixture(scope="module")
def agent_model(tiny_models, tmp_path_factory):
    """Train (LoRA on the tiny Llama, internlm_chat template), then pth_to_hf and merge, all via the CLI."""
    root = tmp_path_factory.mktemp("agent")
    cfg = write_config(
        root / "agent_cfg.py", pretrained_model_name_or_path=str(tiny_models["llama"]), algorithm="lora",
        data_path=_write_data(root), prompt_template="internlm_chat", SYSTEM=AGENT_SYSTEM, max_length=512,
        pack_to_max_length=True, batch_size=1, accumulative_counts=1, max_epochs=2, max_steps=1000, lr=3e-3, warmup_ratio=0.05,
        lora_r=32, lora_alpha=64, lora_dropout=0.0, gradient_checkpointing=False, evaluation_inputs=[],
        save_total_limit=1, log_interval=100)
    cp = run_cli("train", cfg, cwd=root)
    assert cp.returncode == 0, cp.stderr[-3000:]
    last = (root / "work_dirs" / "agent_cfg" / "last_checkpoint").read_text().strip()
    cp = run_cli("convert", "pth_to_hf", cfg, last, root / "adapter", cwd=root)
    assert cp.returncode == 0, cp.stderr[-3000:]
    cp = run_cli("convert", "merge", tiny_models["llama"], root / "adapter", root / "merged", cwd=root)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return {"root": root, "base": tiny_models["llama"], "adapter": root / "adapter", "merged": root / "merged"}


def _chat(*args, input: str):
    return run_cli("chat", *map(str, args), "--temperature", "0", "--max-new-tokens", "60", input=input)


def _react(a: int, b: int) -> list[str]:
    return ["Action: calculate", f'Action Input: {{"expression": "{a}+{b}"}}', f"Response: {a + b}",
            f"Final Answer: {a + b}"]


# --- acceptance 1 and 5: the agent through the CLI ------------------------------------------------------------
@pytest.mark.parametrize("how", ["adapter_folder", "base_and_adapter", "merged_8bit"])
@pytest.mark.slow
def test_lagent_runs_the_calculator_and_answers_with_its_result(how, agent_model):
    """No --prompt-template and no --system: both come from the training run (tunelab.json)."""
    a, b = HELD_OUT[0] if how != "base_and_adapter" else HELD_OUT[1]
    if how == "adapter_folder":
        args = [agent_model["adapter"], "--lagent"]
    elif how == "base_and_adapter":  # the tutorial's command, which crashed in XTuner
        args = [agent_model["base"], "--adapter", agent_model["adapter"], "--lagent", "--with-plugins", "calculate"]
    else:
        args = [agent_model["merged"], "--lagent", "--bits", "8", "--no-streamer"]
    cp = _chat(*args, input=f"What is {a}+{b}?\n")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout.splitlines() == _react(a, b)


@pytest.mark.slow
def test_plugins_stop_at_the_command_run_it_and_resume(agent_model):
    cp = _chat(agent_model["adapter"], "--with-plugins", "calculate", "--system", PLUGIN_SYSTEM,
               input="Use the calculator on 64*5.\n")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout == 'Calculate("64*5")<eoc>\n<|Results|>:\nCalculate("64*5") => 320\n<eor>\nIt is 320.\n'


@pytest.mark.slow
def test_older_stop_word_flag_ends_the_answer(agent_model):
    cp = _chat(agent_model["adapter"], "--answer-stop-word", "Action Input:", input="What is 356+239?\n")
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout == "Action: calculate\n\n"


# --- in-process: the same trained model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(agent_model):
    from tunelab.chat.session import ChatOptions, load_chat_model

    return load_chat_model(ChatOptions(model=str(agent_model["adapter"]), lagent=True))


def _agent(loaded, tools, **kw):
    from tunelab.chat.agent import ReActAgent
    from tunelab.model.generate import Sampling

    model, tokenizer, fmt = loaded
    shown: list[str] = []
    agent = ReActAgent(model, tokenizer, fmt, tools, Sampling(max_new_tokens=60, temperature=0), fmt.stop_words,
                       show=shown.append, **kw)
    return agent, shown


@pytest.mark.slow
def test_chat_uses_the_training_template_and_system(loaded, agent_model):
    _, _, fmt = loaded
    assert fmt.name == "internlm_chat" and fmt.system == AGENT_SYSTEM  # the tiny Llama's own is llama2_chat
    meta = json.loads((agent_model["adapter"] / "tunelab.json").read_text())
    assert meta["prompt_template"] == "internlm_chat"


@pytest.mark.slow
def test_generation_stops_at_the_trained_stop_word(loaded):
    """The model learnt to emit <eoa>; without stop words it runs on past it, with them it stops there."""
    from tunelab.data.formats import Turn
    from tunelab.model.generate import Sampling, generate

    model, tokenizer, fmt = loaded
    ids, _ = fmt.encode([Turn("What is 356+239?", "")], open_last=True)
    greedy = Sampling(max_new_tokens=50, temperature=0)
    raw = generate(model, tokenizer, ids, [], greedy)
    call = 'Action: calculate\nAction Input: {"expression": "356+239"}'
    assert raw.startswith(call + "<eoa>") and len(raw) > len(call + "<eoa>")
    assert fmt.stop_words == ["<eoa>", "</s>"]
    assert generate(model, tokenizer, ids, fmt.stop_words, greedy) == call


@pytest.mark.slow
def test_search_results_reach_the_models_context(loaded, serper):
    agent, shown = _agent(loaded, ["calculate", "search"])
    answer, turns = agent.run(SEARCH_QUESTION, [])
    assert serper.seen[0]["body"] == {"q": "tunelab"}  # the query the model wrote
    assert turns[0].output == 'Action: search\nAction Input: {"query": "tunelab"}'
    assert turns[1].input == ("Response: 1. tunelab: a fine-tuning toolkit\n2. tunelab docs Fine-tune LLMs from "
                              "a config. (https://example.org/tunelab)\n3. Second hit More about tunelab. "
                              "(https://example.org/2)")
    _, _, fmt = loaded
    assert "Fine-tune LLMs from a config." in fmt.render(turns)  # what the model saw for its next step
    assert "\nResponse: 1. tunelab: a fine-tuning toolkit\n" in "".join(shown)
    assert len(turns) == 2 and turns[1].output  # the model replied to the result (what it says is untrained)


@pytest.mark.parametrize("mode,message", [
    ("error", "Response: error: search: the search service answered HTTP 500"),
    ("slow", "Response: error: search: no answer from http://127.0.0.1:"),
    ("nokey", "Response: error: search: SERPER_API_KEY is not set"),
])
@pytest.mark.slow
def test_search_failures_are_fed_back_to_the_model(mode, message, loaded, serper, monkeypatch):
    serper.mode = mode
    monkeypatch.setenv("TUNELAB_SEARCH_TIMEOUT", "0.3")
    if mode == "nokey":
        monkeypatch.delenv("SERPER_API_KEY")
    agent, shown = _agent(loaded, ["calculate", "search"])
    answer, turns = agent.run(SEARCH_QUESTION, [])
    assert turns[1].input.startswith(message)
    assert turns[-1].output  # the loop ended normally (an answer or the step limit), no exception


@pytest.mark.slow
def test_unknown_tool_and_step_limit(loaded):
    agent, shown = _agent(loaded, ["search"], max_steps=2)
    answer, turns = agent.run("What is 356+239?", [])
    assert turns[1].input == "Response: error: there is no tool 'calculate'; use one of: search"
    agent, _ = _agent(loaded, ["calculate"], max_steps=1)
    answer, turns = agent.run("What is 356+239?", [])
    assert answer == "(no final answer after 1 steps)" and turns[1].input == "Response: 595"


# --- flags and defaults (no trained model needed) --------------------------------------------------------------
def test_parse_step_and_tool_argument():
    from tunelab.chat.agent import parse_step, tool_argument

    step = parse_step('Thought: sum\nAction: Calculator\nAction Input: {"expression": "1+2"}\nResponse: 3\nFinal Answer: 3')
    assert (step.action, step.action_input, step.final) == ("Calculator", '{"expression": "1+2"}', None)
    assert step.text == 'Thought: sum\nAction: Calculator\nAction Input: {"expression": "1+2"}'
    assert parse_step("Thought: easy\nFinal Answer: 42").final == "42"
    assert parse_step("just text").final == "just text"
    assert tool_argument("{'keywords': 'x'}", "query") == "x"  # MSAgent data writes Python-literal dicts
    assert tool_argument('"1+1"', "expression") == "1+1" and tool_argument("1+1", "expression") == "1+1"


def test_system_choice():
    from tunelab.chat.agent import agent_system_prompt
    from tunelab.chat.session import ChatOptions, choose_system
    from tunelab.config.catalogue import DATASETS
    from tunelab.errors import UserError

    trained = {"SYSTEM": "trained system"}
    assert choose_system(ChatOptions(model="m", lagent=True), trained) == "trained system"
    assert choose_system(ChatOptions(model="m", lagent=True), {}) == agent_system_prompt(["calculate", "solve",
                                                                                           "search"])
    assert choose_system(ChatOptions(model="m", system="mine", lagent=True), trained) == "mine"
    assert choose_system(ChatOptions(model="m", system_template="alpaca"), trained) == DATASETS["alpaca"]["SYSTEM"]
    moss = choose_system(ChatOptions(model="m", system_template="moss_sft", plugins=["search"], bot_name="Tuney"), {})
    assert "whose name is Tuney" in moss and "Web search: enabled" in moss and "Calculator: disabled" in moss
    with pytest.raises(UserError, match="no system template 'nope'; valid: .*alpaca"):
        choose_system(ChatOptions(model="m", system_template="nope"), {})


@pytest.mark.slow
def test_chat_flags_of_the_spec(tiny_llama):
    cp = run_cli("chat", "--help")
    for flag in ["--adapter", "--prompt-template", "--system", "--system-template", "--bits", "--torch-dtype",
                 "--bot-name", "--with-plugins", "--no-streamer", "--lagent", "--stop-words", "--command-stop-word",
                 "--answer-stop-word", "--offload-folder", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                 "--repetition-penalty", "--seed"]:
        assert flag in cp.stdout, flag
    cp = run_cli("chat", tiny_llama, "--with-plugins", "python", input="hi\n")
    assert cp.returncode == 2 and cp.stderr.strip().splitlines() == [
        "tunelab: error: --with-plugins: unknown tool 'python'; valid: calculate, solve, search"]
    cp = run_cli("chat", tiny_llama, "--system-template", "nope", input="hi\n")
    assert cp.returncode == 2 and "--system-template: no system template 'nope'" in cp.stderr


@pytest.mark.slow
def test_wrong_template_warns(agent_model, capsys):
    from tunelab.chat.session import ChatOptions, load_chat_model

    load_chat_model(ChatOptions(model=str(agent_model["adapter"]), prompt_template="llama2_chat"))
    assert "differs from 'internlm_chat', the template this model was trained with" in capsys.readouterr().err
