"""Training: the loop (loop.py) and what it runs on: the step (step.py), the engines of one process and of
several (engines.py; launch.py starts the processes, processes.py joins them, token_cache.py tokenises once for
a node), checkpoints and the run's logs (checkpoint.py, monitor.py)."""
