"""Dependencies go one way: each module imports only modules of its own layer or below, with no cycle.

The layers, lowest first (the package docstring of ``fmtrain`` says the same in words). Imports inside
functions count too: they hide cycles, they do not remove them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ["fmtrain.config.domains"],  # what values a field may take
    ["fmtrain.config.schema"],
    ["fmtrain.config.io", "fmtrain.config"],  # the schema package imports nothing else of fmtrain
    # Reaches into dependencies' internals, one module per dependency: nothing of fmtrain either.
    ["fmtrain.compat", "fmtrain.compat.deepspeed", "fmtrain.compat.torch", "fmtrain.compat.submitit"],
    ["fmtrain.distributed", "fmtrain.hardware", "fmtrain.models.spec", "fmtrain.parallel", "fmtrain.signals"],
    ["fmtrain.manifests", "fmtrain.watchdog"],  # a run's checkpoint files, without torch; hang detection
    ["fmtrain.models.llama_hf"],  # Hugging Face's Llama layout
    ["fmtrain.models.llama", "fmtrain.models.hf_auto", "fmtrain.models.custom", "fmtrain.models.converters"],
    ["fmtrain.models"],  # the model registry: model.arch -> spec
    ["fmtrain.workpool", "fmtrain.tokenizer"],  # worker processes in order, with a progress line; the tokenizer contract
    ["fmtrain.sources"],  # where text comes from: files, jsonl, parquet, datasets folders, token ids
    ["fmtrain.examples"],  # fine-tuning examples: prompt/completion, chat, target masks
    ["fmtrain.optim", "fmtrain.metrics", "fmtrain.data", "fmtrain.losses", "fmtrain.tokenizer_train"],
    ["fmtrain.pretrained"],  # a run's first weights: Hugging Face directories, fmtrain checkpoints
    ["fmtrain.validation", "fmtrain.strategies.base"],
    ["fmtrain.strategies.ddp", "fmtrain.strategies.fsdp", "fmtrain.strategies.tp", "fmtrain.strategies.zero"],
    ["fmtrain.strategies.fsdp_tp"],
    ["fmtrain.strategies", "fmtrain.plan"],  # the strategy registry; what a plan costs
    ["fmtrain.checkpoint", "fmtrain.step"],  # checkpoints; one step and evaluation
    ["fmtrain.trainer", "fmtrain.export"],
    ["fmtrain.worker", "fmtrain"],  # a launched rank's entry point; the package's lazy run()
    ["launch", "launch.env", "launch.spec", "launch.compose", "launch.tune.space", "launch.tune.results"],
    ["launch.local", "launch.slurm_task", "launch.ray"],
    ["launch.slurm"],
    ["launch.launchers", "launch.tune.trials"],
    ["launch.tune", "launch.commands"],  # launch.commands: what the verbs share
    [f"launch.commands.{verb}" for verb in ("train", "tune", "status", "logs", "cancel", "plan", "export", "tokenizer")],
    ["launch.cli"],  # parses and dispatches to a command's module
]
LAYER = {module: index for index, layer in enumerate(LAYERS) for module in layer}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("fmtrain", "launch"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``path`` imports anywhere (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}
    return found


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below() -> None:
    found = modules()
    assert set(found) == set(LAYER), "a module without a layer, or a layer naming no module"
    upward = [
        f"{module} (layer {LAYER[module]}) imports {target} (layer {LAYER[target]})"
        for module, path in found.items()
        for target in imports_of(path, set(found)) - {module}
        if LAYER[target] > LAYER[module]
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    found = modules()
    graph = {module: imports_of(path, set(found)) - {module} for module, path in found.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module) :], module])
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_config_schema_loads_no_other_module_of_fmtrain() -> None:
    code = "import sys, fmtrain.config; print(sorted(m for m in sys.modules if m.startswith(('fmtrain', 'launch', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    loaded = [m for m in ast.literal_eval(out) if m != "fmtrain" and not m.startswith("fmtrain.config")]
    assert loaded == [], out


# One interpreter imports torch (what loading it leaves in sys.modules is what any fresh interpreter
# that imports torch has), then forks a child per module that imports only that module: each child
# starts from no module of the project's, in a fraction of a second instead of a fresh interpreter's
# seconds. The child's traceback comes back through a file.
ALONE = """
import json, os, sys, traceback
import torch
failed = {}
for module in sys.argv[2:]:
    report = os.path.join(sys.argv[1], module)
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
            code = 0
        except BaseException:
            with open(report, "w") as f:
                f.write(traceback.format_exc())
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed[module] = open(report).read() if os.path.exists(report) else f"exit status {status}"
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def imported_alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each module's traceback when imported on its own, for the modules that failed."""
    reports = tmp_path_factory.mktemp("alone")
    args = [sys.executable, "-c", ALONE, str(reports), *sorted(LAYER)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", sorted(LAYER))
def test_each_module_imports_on_its_own(module: str, imported_alone: dict[str, str]) -> None:
    """An import that works only after another module of the project's was loaded fails here."""
    assert module not in imported_alone, imported_alone.get(module)


def test_a_tokenizing_worker_starts_without_torch() -> None:
    """data.num_workers's processes load what encodes text and examples, not torch (seconds each)."""
    code = (
        "import sys, fmtrain.tokenizer, fmtrain.examples, fmtrain.workpool; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert ast.literal_eval(out) == [], out
