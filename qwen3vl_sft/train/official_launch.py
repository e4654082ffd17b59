"""Child side of the official backend: runs inside the Python environment built for a Qwen3-VL clone.

    python official_launch.py probe /path/to/Qwen3-VL/qwen-vl-finetune
    python -m torch.distributed.run --nproc_per_node 2 --master_port 29600 official_launch.py train spec.json

``probe`` prints one line ``QWEN3VL_PROBE {json}``: package versions, CUDA, flash-attn, and every
module-level import of the clone's training code that does not resolve in this environment.
``train`` registers the site's data set in the clone's ``qwenvl.data.data_dict`` and calls its
``train(attn_implementation=...)`` (see :func:`run_train`).

Without flash-attn (CPU machines, or GPUs it was not built for) both install an import-only stand-in
for it in this process (:func:`stand_in_for_flash_attn`): the clone imports flash-attn at module level
but calls it only for flattened batches, which need flash attention anyway. Nothing is written to disk.

Standard library only: the clone's interpreter does not have our package installed, so
:mod:`qwen3vl_sft.train.official` copies this file next to the round's checkpoint and runs it by path.
In-process mode imports the same functions directly.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

PROBE_PREFIX = "QWEN3VL_PROBE "
ENTRY_MODULE = "qwenvl.train.train_qwen"
DATA_MODULE = "qwenvl.data"
# Import errors that mean "this environment cannot run the clone" (a CUDA-built flash-attn on a machine
# without CUDA raises OSError/RuntimeError from its shared library, not ImportError).
_IMPORT_FAILURES = (ImportError, OSError, RuntimeError, AttributeError)


def search_roots(finetune_dir: str | Path) -> list[Path]:
    """Where the clone's own modules live: ``qwen-vl-finetune/`` and ``qwenvl/train/``.

    ``train_qwen.py`` imports its sibling as ``from trainer import ...``, which only resolves when its own
    folder is on ``sys.path`` (as when run as a script); imported as a module it needs that folder added.
    """
    root = Path(finetune_dir).resolve()
    return [root, root / "qwenvl" / "train"]


def add_clone_to_path(finetune_dir: str | Path) -> None:
    for root in reversed(search_roots(finetune_dir)):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))


# --------------------------------------------------------------------------- flash-attn stand-in

FLASH_ATTN = "flash_attn"


def _refuse_flash_attn(name: str):
    if name.startswith("__"):  # dunder probes (__version__, __file__ ...) must look absent, as they are
        raise AttributeError(name)

    def refuse(*_args, **_kwargs):
        raise RuntimeError(
            f"flash_attn.{name} was called, but flash-attn is not installed in {sys.prefix}: only flattened "
            "batches (data_flatten True) need it; install flash-attn there or train with sdpa attention"
        )

    return refuse


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "Import-only stand-in for flash-attn (qwen3vl_sft official_launch).")
    # A spec without a loader: importlib.util.find_spec() answers as for a real module, and
    # importlib.metadata still finds no distribution, so transformers reports flash-attn unavailable.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__getattr__ = _refuse_flash_attn  # PEP 562: every attribute is a function that refuses
    return module


def flash_attn_available() -> bool:
    """flash-attn is importable here for real (the stand-in's spec has no loader)."""
    spec = importlib.util.find_spec(FLASH_ATTN)
    return spec is not None and spec.loader is not None


def stand_in_for_flash_attn() -> bool:
    """Make ``import flash_attn...`` succeed in this process when flash-attn is absent; True if installed.

    The real package, when present, is never replaced (nor is a broken one hidden: it fails as itself).
    """
    if FLASH_ATTN in sys.modules or importlib.util.find_spec(FLASH_ATTN) is not None:
        return False
    for name in (FLASH_ATTN, f"{FLASH_ATTN}.flash_attn_interface", f"{FLASH_ATTN}.bert_padding"):
        sys.modules[name] = _stand_in_module(name)
    return True


# --------------------------------------------------------------------------- probe


def _local_file(module: str, roots: list[Path]) -> Path | None:
    """The clone's file that defines ``module`` (absolute import), or None for a third-party module."""
    parts = module.split(".")
    for root in roots:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        if base.is_dir():  # a namespace package (the clone's qwenvl/ has no __init__.py)
            return base
    return None


def _package_inits(file: Path, roots: list[Path]) -> list[Path]:
    """``__init__.py`` files between a search root and ``file``: importing a submodule runs them."""
    for root in roots:
        if root in file.parents:
            rel = file.parent.relative_to(root)
            dirs = [root.joinpath(*rel.parts[: i + 1]) for i in range(len(rel.parts))]
            return [d / "__init__.py" for d in dirs if (d / "__init__.py").is_file()]
    return []


def _relative_targets(node: ast.ImportFrom, file: Path) -> list[Path]:
    package = file.parent
    for _ in range(node.level - 1):
        package = package.parent
    base = package.joinpath(*node.module.split(".")) if node.module else package
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    targets = [base / "__init__.py"] if (base / "__init__.py").is_file() else []
    return targets + [base / f"{a.name}.py" for a in node.names if (base / f"{a.name}.py").is_file()]


def clone_imports(finetune_dir: str | Path) -> list[tuple[str, list[str]]]:
    """Third-party ``(module, names)`` imported at module level by the clone's training entry point.

    Follows the clone's own imports from ``train_qwen.py`` (only module-level statements: they are what
    runs, and fails, when the entry point is imported), so files it never imports are not held against
    the environment.
    """
    roots = search_roots(finetune_dir)
    todo = [roots[1] / "train_qwen.py"]
    seen: set[Path] = set()
    found: list[tuple[str, list[str]]] = []
    while todo:
        file = todo.pop()
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        for node in ast.parse(file.read_text(encoding="utf-8"), str(file)).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                todo += _relative_targets(node, file)
                continue
            if isinstance(node, ast.ImportFrom):
                pairs = [(node.module or "", [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                pairs = [(a.name, []) for a in node.names]
            else:
                continue
            for module, names in pairs:
                local = _local_file(module, roots)
                if local is None:
                    found.append((module, names))
                elif local.is_file():
                    todo += [local, *_package_inits(local, roots)]
    return found


def check_import(module: str, names: list[str]) -> str | None:
    """Why ``from module import names`` fails here, or None when it works."""
    try:
        mod = importlib.import_module(module)
    except _IMPORT_FAILURES as err:
        return f"import {module}: {type(err).__name__}: {err}".splitlines()[0]
    missing = []
    for name in names:
        if name == "*" or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")  # ``from pkg import submodule``
        except _IMPORT_FAILURES:
            missing.append(name)
    return f"from {module} import {', '.join(missing)}: not found" if missing else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(finetune_dir: str | Path) -> dict:
    """What this environment offers the clone, and which of the clone's imports fail in it."""
    flash_attn = flash_attn_available()
    stand_in = stand_in_for_flash_attn()
    problems = [p for module, names in clone_imports(finetune_dir) if (p := check_import(module, names))]
    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = bool(torch.cuda.is_available())
    return {
        "python": sys.executable,
        "prefix": sys.prefix,
        "versions": {d: _version(d) for d in ("torch", "transformers", "flash_attn", "deepspeed", "peft")},
        "cuda": cuda,
        "flash_attn": flash_attn,
        "flash_attn_stand_in": stand_in,
        "problems": problems,
    }


# --------------------------------------------------------------------------- train


def register_dataset(name: str, annotation_path: str, data_path: str) -> None:
    """Add the site's data set to the clone's registry, as its own data sets are declared."""
    registry = importlib.import_module(DATA_MODULE).data_dict
    registry[name] = {"annotation_path": annotation_path, "data_path": data_path}


def run_train(spec: dict) -> None:
    """Register the data set and call the clone's ``train()`` with ``spec["argv"]`` as its command line."""
    add_clone_to_path(spec["finetune_dir"])
    if spec["attn_implementation"] != "flash_attention_2":
        stand_in_for_flash_attn()
    register_dataset(spec["dataset_name"], spec["annotation_path"], spec["data_path"])
    entry = importlib.import_module(ENTRY_MODULE)
    expected = search_roots(spec["finetune_dir"])[0]
    if expected not in Path(entry.__file__).resolve().parents:
        raise RuntimeError(
            f"{ENTRY_MODULE} was already imported from {entry.__file__}, not from {expected}: "
            "one process can run only one Qwen3-VL clone (use subprocess mode)"
        )
    # The clone's train() reads its arguments from sys.argv through HfArgumentParser: that is its
    # public contract (it is written to be a torchrun script), so the argv is set for the call only.
    saved = sys.argv
    sys.argv = [entry.__file__, *spec["argv"]]
    try:
        entry.train(attn_implementation=spec["attn_implementation"])
    finally:
        sys.argv = saved


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("probe", "train"):
        raise SystemExit("usage: official_launch.py probe FINETUNE_DIR | train SPEC.json")
    command, arg = argv
    if command == "probe":
        print(PROBE_PREFIX + json.dumps(probe(arg)), flush=True)
        return
    run_train(json.loads(Path(arg).read_text(encoding="utf-8")))


if __name__ == "__main__":
    main(sys.argv[1:])
