"""Named system texts for `tunelab chat --system-template NAME`.

Each dataset of the built-in configs contributes the SYSTEM text its configs train with (so chatting with a
model fine-tuned by, say, an `_alpaca_` config can use exactly that text), plus `moss_sft` (MOSS's plugin
meta instruction, filled in for the enabled plugins) and `lagent` (the ReAct agent prompt for all tools).
`{bot_name}` in a text is replaced by --bot-name."""
from __future__ import annotations


def system_templates() -> dict[str, str]:
    """name -> system text."""
    from tunelab.chat.agent import agent_system_prompt
    from tunelab.config.catalogue import DATASETS
    from tunelab.tools import TOOLS
    from tunelab.tools.plugins import plugin_system_prompt

    named = {key: values["SYSTEM"] for key, values in DATASETS.items() if values.get("SYSTEM")}
    named["moss_sft"] = plugin_system_prompt([])
    named["lagent"] = agent_system_prompt(list(TOOLS))
    return dict(sorted(named.items()))


def get_system_template(name: str) -> str:
    """The system text called `name`; ValueError listing the valid names."""
    named = system_templates()
    if name not in named:
        raise ValueError(f"no system template '{name}'; valid: {', '.join(named)}")
    return named[name]
