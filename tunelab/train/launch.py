"""Several processes, GPUs and machines: `NPROC_PER_NODE=N [NNODES=M NODE_RANK=R ADDR=host PORT=p] tunelab
train ...` re-runs itself under `python -m torch.distributed.run` (PyTorch's own launcher) and returns the exit
code of the rank that failed first (torchrun itself answers 1 for any failure, which would lose the 2 of bad
input and the 130 of Ctrl-C). The process group and the engines are in processes.py and engines.py.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tunelab.errors import UserError

log = logging.getLogger("tunelab")

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")
EXIT_DIR_VAR = "TUNELAB_EXIT_DIR"       # set by launch(): each rank leaves its exit code and error line here

def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < low:
        raise UserError(f"environment variable {name}={raw!r}: expected a whole number >= {low}")
    return int(raw)


def launch_requested() -> bool:
    """True when NPROC_PER_NODE > 1 or NNODES > 1 and this process is not already a torchrun worker."""
    if under_torchrun():
        return False
    return _env_int("NPROC_PER_NODE", 1, 1) > 1 or _env_int("NNODES", 1, 1) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m tunelab ARGV` from the XTuner-style environment variables."""
    nproc, nnodes = _env_int("NPROC_PER_NODE", 1, 1), _env_int("NNODES", 1, 1)
    node_rank = _env_int("NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    if nnodes > 1 and not os.environ.get("ADDR"):
        raise UserError("NNODES > 1 needs ADDR (the address of the NODE_RANK=0 machine) and PORT")
    addr = os.environ.get("ADDR") or "127.0.0.1"
    # one machine: a free port, so that concurrent jobs do not collide on torchrun's default 29500
    port = _env_int("PORT", 0, 1) or (29500 if nnodes > 1 else free_port())
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}",
            "-m", "tunelab", *argv]


def launch(argv: list[str]) -> int:
    """Run `tunelab ARGV` on every local rank through torchrun; the exit code of the first rank that failed.

    torchrun runs in its own session so that Ctrl-C reaches the ranks once, as the SIGTERM torchrun forwards
    (each rank then finishes its step and saves a checkpoint). Its own report of a failed child (a traceback
    of ChildFailedError or SignalException) is dropped from stderr: the rank's own one-line error is what the
    user needs."""
    cmd = torchrun_command(argv)
    exit_dir = Path(tempfile.mkdtemp(prefix="tunelab_exit_"))
    env = dict(os.environ, **{EXIT_DIR_VAR: str(exit_dir)})
    nproc = _env_int("NPROC_PER_NODE", 1, 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", bufsize=1, start_new_session=True)
    interrupted: list[int] = []

    def forward(signum, frame):
        interrupted.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _relay_stderr(proc.stderr)
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        code = _exit_code(rc, exit_dir)
        # Ctrl-C reached the ranks as torchrun's SIGTERM; answer like a one-process run would
        return 128 + signal.SIGINT if interrupted and interrupted[0] == signal.SIGINT and code == 143 else code
    finally:
        for f in exit_dir.iterdir():
            f.unlink()
        exit_dir.rmdir()


_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} [\d:.]+ \d+ .*torch/distributed/(elastic|run)")


def _relay_stderr(stream) -> None:
    """Copy the ranks' stderr through, without torchrun's own chatter about failed or stopped children."""
    held: list[str] = []  # a traceback, held until its last line says whose it is
    dropping = False
    for line in stream:
        if dropping or _TORCHRUN_LOG.match(line):
            continue
        if held or line.startswith("Traceback (most recent call last):"):
            held.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):
                if "ChildFailedError" in line or "SignalException" in line:
                    dropping = True  # torchrun's own report; everything after it is torchrun's too
                else:
                    sys.stderr.write("".join(held))
                held = []
            continue
        sys.stderr.write(line)
    sys.stderr.write("".join(held))
    sys.stderr.flush()


def _exit_code(rc: int, exit_dir: Path) -> int:
    """Rank 0's exit code if it failed, else the lowest failing rank's; printing that rank's error line
    when it stayed quiet (only rank 0 prints)."""
    reports = {}
    for f in exit_dir.glob("rank*"):
        code, _, message = f.read_text(encoding="utf-8").partition("\n")
        reports[int(f.name[4:])] = (int(code), message.strip())
    failed = sorted(r for r, (code, _) in reports.items() if code != 0)
    if failed:
        rank = failed[0]
        code, message = reports[rank]
        if rank != 0 and message:  # rank 0 printed its own
            print(message, file=sys.stderr)
        return code
    if rc != 0:  # a rank died without reporting (killed, crashed in C code): torchrun's own code
        print(f"tunelab: error: a training process died (torchrun exit code {rc}); see the messages above",
              file=sys.stderr)
        return rc if rc > 0 else 128 - rc
    return 0


_error: list[str] = []


def error_line(text: str) -> None:
    """Print a final error line; a worker of launch() other than rank 0 keeps it for the launcher instead
    (every rank usually fails the same way, and the user should read it once)."""
    _error[:] = [text]
    if os.environ.get(EXIT_DIR_VAR) and int(os.environ.get("RANK", "0")) != 0:
        return
    print(text, file=sys.stderr)


def record_exit(code: int) -> None:
    """Leave this rank's exit code (and error line) where launch() reads them."""
    folder = os.environ.get(EXIT_DIR_VAR)
    if folder and os.path.isdir(folder):
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank{rank}").write_text(f"{code}\n{_error[0] if _error else ''}", encoding="utf-8")
