"""Tokenising once for all the ranks of a node: the first local rank to take the cache's file lock tokenises
into a cache file keyed by the data files, the tokenizer and the config keys that change encoding; the others
wait on the lock (not in a collective, so a tokenisation longer than the collective timeout cannot kill the job)
and read the file."""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.train.processes import Context

log = logging.getLogger("tunelab")

_ENCODING_KEYS = ("seed", "validation_split", "evaluation_data_path", "objective")  # besides the model and data groups
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
    for source in sorted((Path(__file__).parents[1] / "data").glob("*.py")):
        _hash_file(h, source)
    return h.hexdigest()[:20]


def tokenise_once(ctx: Context, cfg, model_path: str, work_dir: Path, build):
    """`build()` (the tokenised data), made once per node and shared through a cache file; with one process just
    `build()`. Bad data fails on the first rank that builds, and again on each that takes the lock after it (in
    seconds, with the same message), so no rank waits for a file that will never come."""
    if ctx.world_size == 1:
        return build()
    from filelock import FileLock

    folder = work_dir / "tokenized_cache"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cache_key(cfg, model_path)}.pkl"
    started = time.time()
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            log.info("tokenised data from the cache %s (after %.0fs)", path, time.time() - started)
            with open(path, "rb") as f:
                return pickle.load(f)
        log.info("tokenising; the node's other ranks wait for %s", path)
        result = build()
        from tunelab.train.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, lambda f: pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL))
        return result
