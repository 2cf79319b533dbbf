"""llama.cpp itself runs a tunelab GGUF (issue 33, acceptance 2): train the demo, convert its adapter to GGUF and
ask llama.cpp (through llama-cpp-python) "who are you" with the chat template and stop token the file carries.

    .venv/bin/pip install llama-cpp-python      # builds llama.cpp from source: give it cores (CMAKE_BUILD_PARALLEL_LEVEL)
    .venv/bin/python bench/llama_cpp_gguf.py [WORK_DIR]

Not in CI: the package index has no llama-cpp-python wheel for this platform, and building llama.cpp from
source takes about 15 minutes of CI's 2 cores (bench/RESULTS.md). Prints one line per
check and exits 1 if the answer differs. Also writes q4_k_m through llama.cpp's quantiser and loads it.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ANSWER = "I am tunelab's assistant, a small model fine-tuned on your own data."


def tunelab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tunelab", *args], check=True)


def ask(gguf: Path, question: str) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False, seed=0)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0,
                                       max_tokens=80)
    return reply["choices"][0]["message"]["content"]


def main() -> int:
    import llama_cpp  # noqa: F401 - fail first, before a three-minute training run

    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tunelab_gguf_"))
    if not (work / "demo" / "hf").is_dir():
        tunelab("train", "demo", "--work-dir", str(work / "demo"))
    ok = True
    for outtype in ("f16", "q8_0", "q4_k_m"):
        gguf = work / f"demo-{outtype}.gguf"
        tunelab("convert", "gguf", str(work / "demo" / "hf"), str(gguf), "--outtype", outtype, "--ollama")
        answer = ask(gguf, "who are you")
        same = answer.strip() == ANSWER
        ok &= same or outtype == "q4_k_m"  # 4-bit may change a tiny model's answer; it must load and answer
        print(f"{outtype}: {'same answer' if same else 'DIFFERENT answer'}: {answer!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
