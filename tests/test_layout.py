"""The code's layout, as README's Architecture section draws it, checked from the source itself.

- Data flows one way, `jobs -> pipeline -> mrcnn`; inside `pipeline`, `segment` and `train` never
  import each other, both may import `cluster`, and `cluster` imports neither; `mrcnn` imports no
  Ray. No two modules import each other, directly or around a circle (imports inside functions
  count too).
- A module is at most ~400 lines and a function at most ~60 (`LONG_FUNCTIONS` names the one
  exception, and why).
- Every dotted `mrcnn.`, `pipeline.` or `jobs.` name in a docstring names a module, or a name in a
  module, that exists.
- A file name of a run folder or a segmentation output is spelled in the one module that owns the
  layout; COCO RLE is encoded and decoded in `mrcnn/rle.py` alone.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mrcnn", "pipeline", "jobs")
MAX_MODULE_LINES = 410
MAX_FUNCTION_LINES = 62
# torchvision's RoIHeads.forward, overridden whole for the softmax mask loss: its steps (training
# targets, box head, mask head, losses) read in torchvision's order, docstring included.
LONG_FUNCTIONS = {"mrcnn/roi_heads.py:forward"}
# The file names of an output folder, and the only module each may be spelled in.
OWNED_NAMES = {
    "metrics.jsonl": "pipeline/train/run_folder.py",
    "run.json": "pipeline/train/run_folder.py",
    "training_state.pt": "pipeline/train/run_folder.py",
    "_SUCCESS.json": "pipeline/segment/output.py",
    "_JOB.json": "pipeline/segment/provenance.py",
    "model.json": "mrcnn/model_spec.py",
    "weights.pt": "mrcnn/model_spec.py",
}


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (`from package import module`
    counts as the module)."""
    known = modules()
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = named & set(known)
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(node.module)
            if node.module.split(".")[0] not in PACKAGES:
                names.update(named)  # `from pycocotools import mask` is `pycocotools.mask`
    return names


def project_imports() -> dict[str, set[str]]:
    known = modules()
    return {name: {n for n in imports_of(path) if n in known and n != name} for name, path in known.items()}


def wing(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


# Which wings a wing may import (beside itself).
ALLOWED = {
    "mrcnn": set(),
    "pipeline.cluster": {"mrcnn"},
    "pipeline.segment": {"mrcnn", "pipeline.cluster"},
    "pipeline.train": {"mrcnn", "pipeline.cluster"},
    # Reads the output folder the segment wing owns (its schema, its provenance); runs no Ray.
    "pipeline.results": {"mrcnn", "pipeline.segment"},
    "jobs": {"mrcnn", "pipeline.cluster", "pipeline.segment", "pipeline.train", "pipeline.results"},
}


def test_data_flows_one_way_between_the_wings():
    wrong = []
    for name, imported in project_imports().items():
        if name == "pipeline":
            continue
        for other in imported:
            if other != "pipeline" and wing(other) != wing(name) and wing(other) not in ALLOWED[wing(name)]:
                wrong.append(f"{name} imports {other}")
    assert wrong == []


def test_mrcnn_imports_no_ray():
    ray_users = [name for name, path in modules().items() if name.startswith("mrcnn")
                 and any(n == "ray" or n.startswith("ray.") for n in imports_of(path))]  # fmt: skip
    assert ray_users == []


def test_no_two_modules_import_each_other_even_around_a_circle():
    graph = project_imports()
    cycles = []

    def visit(name: str, path: list[str], done: set[str]) -> None:
        for other in sorted(graph.get(name, ())):
            if other in path:
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in done:
                visit(other, [*path, other], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], done)
    assert cycles == []


def test_no_module_over_400_lines_and_no_function_over_60():
    long = []
    for path in modules().values():
        relative = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{relative}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{relative}:{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


DOTTED = re.compile(r"`((?:mrcnn|pipeline|jobs)(?:\.[A-Za-z_]\w*)+)`")


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    kinds = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    nodes = [tree] + [node for node in ast.walk(tree) if isinstance(node, kinds)]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_dotted_name_in_a_docstring_exists(name):
    path = modules()[name]
    names = {match for doc in docstrings(path) for match in DOTTED.findall(doc.replace("\n", " "))}
    # A name cut by a line break inside backticks (`pipeline.cluster.\n placement`) joins again.
    missing = sorted(dotted for dotted in names if not resolves(dotted.replace(" ", "")))
    assert missing == [], f"{path.relative_to(REPO)} names what does not exist"


def test_output_file_names_are_spelled_by_their_owner_only():
    spelled = []
    for path in modules().values():
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            owner = OWNED_NAMES.get(node.value) if isinstance(node, ast.Constant) else None
            if owner is not None and owner != relative:
                spelled.append(f"{relative}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_rle_is_encoded_and_decoded_in_one_module():
    users = [path.relative_to(REPO).as_posix() for path in modules().values()
             if "pycocotools.mask" in imports_of(path)]  # fmt: skip
    assert users == ["mrcnn/rle.py"]
