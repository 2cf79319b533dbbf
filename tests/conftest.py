"""Shared fixtures: tiny real models built once per session, the shared data folder, a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep builtin:tiny-* models, HF caches and the network out of the user's machine."""
    home = tmp_path_factory.mktemp("tunelab_home")
    os.environ["TUNELAB_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield home


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"shared data not found at {DATA}"
    return DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model + tokenizer per architecture that the installed transformers has (InternLM 3 came
    after 5.17, the GPU machine's), saved in Hugging Face format."""
    import transformers

    from tunelab.model.tiny import ARCHS, build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch, (config_class, *_) in ARCHS.items()
            if hasattr(transformers, config_class)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def run_cli(*args: str, cwd: Path | str | None = None, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `tunelab ARGS` as a real subprocess (python -m tunelab), capturing text output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_losses(work: Path) -> dict[int, float]:
    """step -> logged loss over every run (timestamp folder) in a work dir, later runs overriding earlier."""
    import json

    out: dict[int, float] = {}
    for scalars in sorted(Path(work).glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def assert_packed_equals_alone(model, packed: list, alone: list, pad_id: int) -> None:
    """The per-token losses of `packed` (one row holding the `alone` sequences in order) equal each sequence's
    losses computed alone (fp32, 1e-5)."""
    import torch

    from tunelab.data.dataset import collate
    from tunelab.model.losses import token_losses

    with torch.no_grad():
        together = token_losses(model, collate(packed, pad_id), torch.float32)[0]
        offset = 0
        for seq in alone:
            own = token_losses(model, collate([seq], pad_id), torch.float32)[0]
            torch.testing.assert_close(together[offset:offset + len(seq)], own, atol=1e-5, rtol=0)
            offset += len(seq)


def write_config(path: Path, **values) -> Path:
    """A config file with these top-level settings."""
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()), encoding="utf-8")
    return path


def edit_config(path: Path, **values) -> None:
    """Change top-level settings of a copied config the way a user would: rewrite their lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for key, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
        assert len(hits) == 1, f"{key} appears {len(hits)} times in {path}"
        lines[hits[0]] = f"{key} = {value!r}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter for the tiny Llama (hidden size 128), as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log_file: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`tunelab serve MODEL ARGS` on a free port of 127.0.0.1, once its /health answers: (process, base URL)."""
    import time

    import httpx

    port = free_port()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log_file.read_text()[-3000:]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start: " + log_file.read_text()[-3000:]
        time.sleep(0.3)


def fault_env(spec: str) -> dict[str, str]:
    """Environment for a CLI subprocess with the faults of `spec` armed in every Python process of its run
    (tests/fault_injection.py; the product has no hooks for them)."""
    faults = str(Path(__file__).parent / "faults")
    return {"TUNELAB_FAULT": spec,
            "PYTHONPATH": os.pathsep.join(p for p in (faults, os.environ.get("PYTHONPATH", "")) if p)}
