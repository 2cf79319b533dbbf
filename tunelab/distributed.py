"""Several processes, GPUs and machines: launching through torchrun, the process group, tokenising once.

`NPROC_PER_NODE=N [NNODES=M NODE_RANK=R ADDR=host PORT=p] tunelab train ...` re-runs itself under
`python -m torch.distributed.run` (PyTorch's own launcher) and returns the exit code of the rank that
failed first. Each rank then joins a process group (gloo on CPU, nccl on CUDA). Rank 0 of each node
tokenises the data into a cache keyed by the data files, the tokenizer and the config keys that change
encoding; the other ranks poll for that file instead of waiting in a collective, so a tokenisation that
takes longer than the collective timeout cannot kill the job. Only rank 0 logs, writes run files and
checkpoints; the engines themselves (DDP, FSDP2, DeepSpeed) are in tunelab/parallel.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from tunelab.errors import UserError

log = logging.getLogger("tunelab")

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")
TIMEOUT_VAR = "TUNELAB_DIST_TIMEOUT"     # seconds a collective may wait (default 1800, PyTorch's own)
EXIT_DIR_VAR = "TUNELAB_EXIT_DIR"       # set by launch(): each rank leaves its exit code and error line here
RUN_ID_VAR = "TUNELAB_RUN_ID"
POLL_SECONDS = 0.5


# --- launching -----------------------------------------------------------------------------------

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
    env = dict(os.environ, **{EXIT_DIR_VAR: str(exit_dir), RUN_ID_VAR: uuid.uuid4().hex})
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


# --- the process group ---------------------------------------------------------------------------

@dataclass
class Context:
    """Where this process stands: its rank among world_size, the device it trains on."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None


def setup(need_group: bool = False) -> Context:
    """Join the process group when started by torchrun (or alone when an engine such as DeepSpeed needs a
    group of one); otherwise a single-process context. Ranks other than 0 log errors only."""
    import torch

    cuda = torch.cuda.is_available()
    if not under_torchrun() and not need_group:
        return Context(device="cuda" if cuda else "cpu")
    if not under_torchrun():  # a group of one, e.g. `tunelab train cfg --deepspeed deepspeed_zero2` on one GPU
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = "cpu"
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if cuda else "gloo"
    timeout = float(os.environ.get(TIMEOUT_VAR) or 1800)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    if rank != 0:
        log.setLevel(logging.ERROR)
    log.info("process group: %s, %d processes, collective timeout %gs", backend, world, timeout)
    return Context(rank, local, world, device, backend)


def teardown(ctx: Context, finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on every rank, first wait for the others: a rank
    that left while another still talked to it ended that one with 'terminate called without an active
    exception' (seen once in a loaded test run of FSDP2 on gloo). After an error, leave at once."""
    if ctx.grouped:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def all_gather_objects(ctx: Context, value) -> list:
    """Every rank's `value`, in rank order (just [value] for one process)."""
    if not ctx.grouped or ctx.world_size == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


# --- tokenising once -----------------------------------------------------------------------------

_ENCODING_KEYS = ("seed", "validation_split", "evaluation_data_path")  # besides the model and data groups
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def _hash_file(h, path: Path) -> None:
    h.update(str(path.resolve()).encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def cache_key(cfg, model_path: str) -> str:
    """Changes whenever tokenised data could: the data files' bytes, the tokenizer files, the config keys of
    the model and data groups (plus seed and validation settings), and tunelab's own encoding code."""
    from tunelab.config.schema import FIELDS, to_dict
    from tunelab.data.loading import resolve_data_files

    h = hashlib.sha256()
    values = to_dict(cfg)
    keys = sorted(k for k, f in FIELDS.items() if f.metadata["group"] in ("model", "data") or k in _ENCODING_KEYS)
    h.update(repr([(k, values[k]) for k in keys]).encode())
    held_out = cfg.evaluation_data_path or []
    sources = [*cfg.data_paths, *(held_out if isinstance(held_out, list) else [held_out])]
    for source in sources:
        try:
            files = resolve_data_files(source)
        except UserError:
            files = []  # the build will report it
        for file in files:
            if os.path.isfile(file):
                _hash_file(h, Path(file))
            else:
                h.update(file.encode())  # a hub dataset id
    model_dir = Path(model_path)
    if model_dir.is_dir():
        for file in sorted(model_dir.iterdir()):
            if file.is_file() and not file.name.endswith(_WEIGHT_FILES):
                _hash_file(h, file)
    for source in sorted((Path(__file__).parent / "data").glob("*.py")):
        _hash_file(h, source)
    return h.hexdigest()[:20]


def tokenise_once(ctx: Context, cfg, model_path: str, work_dir: Path, build):
    """`build()` (the tokenised data) on local rank 0, shared with the node's other ranks through a cache
    file they poll for; with one process just `build()`. A UserError on rank 0 (bad data) makes the others
    exit with it too instead of waiting forever."""
    if ctx.world_size == 1:
        return build()
    folder = work_dir / "tokenized_cache"
    key = cache_key(cfg, model_path)
    path = folder / f"{key}.pkl"
    run = os.environ.get(RUN_ID_VAR) or os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
    failed = folder / f"{key}.{run}.error"
    if ctx.local_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            log.info("tokenised data from the cache %s", path)
            with open(path, "rb") as f:
                return pickle.load(f)
        log.info("tokenising on rank 0; the other ranks wait for %s", path)
        try:
            result = build()
        except UserError as exc:
            failed.write_text(str(exc), encoding="utf-8")
            raise
        from tunelab.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, lambda f: pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL))
        return result
    started = time.time()
    while not path.is_file():
        if failed.is_file():
            raise UserError(failed.read_text(encoding="utf-8"))
        time.sleep(POLL_SECONDS)
    log.info("rank %d: tokenised data ready after %.0fs", ctx.rank, time.time() - started)
    with open(path, "rb") as f:
        return pickle.load(f)


class NullMonitor:
    """RunMonitor's interface for ranks other than 0: they write no logs, scalars or plots."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
