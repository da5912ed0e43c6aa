"""The architecture as drawn in docs/architecture.md, enforced: who may import whom, who owns
which file name, torch-free entry points, and a CLI that only maps verbs to functions."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dsfm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports, also inside functions (`from a import b` is a.b when b is
    a module, else a)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            names |= submodules or {node.module}
    return names


def dsfm_imports(path: Path) -> set[str]:
    return {m for m in imports(path) if m in MODULES and m != "dsfm"}


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_cycles():
    graph = {m: dsfm_imports(p) - {m} for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


# package -> the dsfm modules it may import besides its own
ALLOWED = {
    "dsfm.model": [],
    "dsfm.data": ["dsfm.atomic", "dsfm.hub", "dsfm.progress"],
    "dsfm.distributed": [],
    "dsfm.testing": [],
    # the formats a config names (datasets, checkpoints), read in the resolve step
    "dsfm.config": ["dsfm.model.config", "dsfm.data.format", "dsfm.data.tokenizer"]
    + ["dsfm.train.checkpoint"],
    "dsfm.observe": ["dsfm.config.schema", "dsfm.config.deepspeed", "dsfm.gpus", "dsfm.progress"]
    + ["dsfm.model.config", "dsfm.model.sizes", "dsfm.train.checkpoint"],
    # training's outputs are read through their formats, and ZeRO weights through the engine;
    # benchmark results are saved in the run directory
    "dsfm.eval": ["dsfm.data", "dsfm.model", "dsfm.distributed", "dsfm.interop", "dsfm.progress"]
    + ["dsfm.train.checkpoint", "dsfm.observe.rundir"],
    # export writes the tokenizer's chat template (dsfm's, as Jinja) beside the tokenizer
    "dsfm.interop": [
        "dsfm.atomic",
        "dsfm.hub",
        "dsfm.progress",
        "dsfm.config",
        "dsfm.data.tokenizer",
    ]
    + ["dsfm.model"]
    + ["dsfm.data.chat", "dsfm.train.checkpoint", "dsfm.train.engine"],
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_their_layer_allows(package):
    bad = {
        (m, dep)
        for m, path in MODULES.items()
        if under(m, package)
        for dep in dsfm_imports(path)
        if not under(dep, package, *ALLOWED[package])
    }
    assert not bad, sorted(bad)


def test_only_the_engine_imports_deepspeed():
    importers = {
        m for m, p in MODULES.items() if any(i.split(".")[0] == "deepspeed" for i in imports(p))
    }
    assert importers == {"dsfm.train.engine"}


def test_model_holds_no_distributed_code():
    for m, p in MODULES.items():
        if under(m, "dsfm.model"):
            assert not any(i.startswith("torch.distributed") for i in imports(p)), m


def test_nothing_inside_imports_the_cli():
    # dsfm.launch.* are the launchers' entry points: outside, like the cli itself
    inside = {m: p for m, p in MODULES.items() if not under(m, "dsfm.launch")}
    assert not [m for m, p in inside.items() if "dsfm.cli" in dsfm_imports(p)]


TORCH_FREE = [
    "dsfm",  # the library names are imported lazily (`dsfm.__getattr__`)
    "dsfm.cli",
    "dsfm.plan",
    "dsfm.config.resolve",
    "dsfm.config.reference",
    "dsfm.observe.runs",
    "dsfm.observe.summary",
    "dsfm.observe.monitor",
    "dsfm.train.checkpoint",
    "dsfm.distributed.slurm",
]


def test_light_entry_points_import_no_torch():
    """`dsfm plan`, `dsfm runs`, config checks and Slurm dry runs start in a blink."""
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in TORCH_FREE)
    code += "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# file name -> the modules that may spell it (everyone else uses their constants/functions)
OWNERS = {
    "meta.json": {"dsfm.data.format"},
    "tokenizer.json": {"dsfm.data.tokenizer"},
    "tokenizer_config.json": {"dsfm.data.tokenizer"},
    "special_tokens_map.json": {"dsfm.data.tokenizer"},
    "dsfm_state.json": {"dsfm.train.checkpoint"},
    "manifest.json": {"dsfm.train.checkpoint"},
    "rng_rank": {"dsfm.train.checkpoint"},
    "metrics.jsonl": {"dsfm.observe.rundir"},
    "samples.jsonl": {"dsfm.observe.rundir"},
    "summary.json": {"dsfm.observe.rundir"},
    "config.yaml": {"dsfm.observe.rundir"},
    "ds_config.json": {"dsfm.observe.rundir"},
    "metrics.csv": {"dsfm.observe.rundir"},
    "model.safetensors": {"dsfm.interop.weights", "dsfm.interop.hf"},  # plain; HF's own
    "config.json": {"dsfm.interop.hf"},  # Hugging Face's
    "adapter_config.json": {"dsfm.interop.adapter"},  # PEFT's
    "adapter_model.safetensors": {"dsfm.interop.adapter"},
}
# plain words: owned where they name a path (`run / "checkpoints"`)
PATH_WORDS = {"checkpoints": {"dsfm.observe.rundir"}, "latest": {"dsfm.train.checkpoint"}}


def strings(path: Path) -> tuple[list[str], list[str]]:
    """(string literals, f-string parts included, but not docstrings or field docs; the
    literals joined to a path with `/`)."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    literals = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]
    joined = [
        node.right.value
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Div)
        and isinstance(node.right, ast.Constant)
        and isinstance(node.right.value, str)
    ]
    return literals, joined


def test_only_format_owners_spell_their_file_names():
    spelled = set()
    for m, path in MODULES.items():
        literals, joined = strings(path)
        for name, owners in OWNERS.items():
            pattern = re.compile(rf"(?<![\w.]){re.escape(name)}")
            if m not in owners and any(pattern.search(text) for text in literals):
                spelled.add((name, m))
        spelled |= {(w, m) for w, owners in PATH_WORDS.items() if w in joined and m not in owners}
    assert not spelled, sorted(spelled)


def test_cli_only_maps_verbs_to_functions():
    from dsfm import cli

    tree = ast.parse(Path(cli.__file__).read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    # `run` is the process entry: `main`, then the exit (`_joined_process_group`: how).
    functions = functions - {"run", "_joined_process_group"}
    assert functions == {"main", "build_parser", "add_train_args", "_verb"}
    assert imports(Path(cli.__file__), top_level_only=True) <= {
        "__future__",
        "argparse",
        "importlib",
        "logging",
        "os",
        "sys",
        "traceback",
        "typing",
    }
    # Every verb's function takes exactly the verb's arguments, by name.
    parser = cli.build_parser()
    for verb, (module, function) in cli.VERBS.items():
        p = parser
        for word in verb.split():
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[
                word
            ]
        args = {a.dest for a in p._actions} - {"help", "local_rank"}
        params = set(
            inspect.signature(getattr(importlib.import_module(module), function)).parameters
        )
        assert args == params, (verb, args ^ params)


def test_test_files_have_unique_names():
    # The tests are not packages (no __init__.py), so pytest imports each file by its base
    # name: two test_x.py in different folders break collection of the whole suite, which a
    # run of one folder never shows.
    seen: dict[str, Path] = {}
    for path in sorted((PKG.parent / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]}: rename one"
        seen[path.name] = path
