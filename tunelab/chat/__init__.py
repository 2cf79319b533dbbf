"""`tunelab chat` and what it drives: the chat session (session.py), the ReAct agent (agent.py) and the named
system texts (system_templates.py)."""
