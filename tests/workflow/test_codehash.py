"""A rule's code hash is the import closure of its entry script: edits rerun exactly what can run them."""

import dis
import queue
import re
import shutil
import subprocess
import sys
import types
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.workflow import copy_run, main_config

from d2retrain.core.codehash import PACKAGE_ROOT, code_hash, import_closure, imported_names

SCRIPTS = REPO / "workflow" / "scripts"
MODULES = sorted(path.relative_to(PACKAGE_ROOT).as_posix() for path in PACKAGE_ROOT.rglob("*.py"))


def _edited_modules() -> list[str]:
    """The modules the workflow test edits: every module that no entry script runs (an edit must
    replan nothing), and one per distinct set of entry scripts that run it. Modules run by the same
    scripts are in the same rules' closures, and the code hash reads every file of a closure, so
    an edit to any of them replans the same jobs; a dry run costs ~4 s, and editing all 74 modules
    took 3.5 minutes of the test command, one per set takes a third of it."""
    closures = [import_closure(script, PACKAGE_ROOT) for script in sorted(SCRIPTS.glob("*.py"))]
    chosen: dict[tuple[int, ...], str] = {}
    edited = []
    for module in sorted(MODULES, key=lambda name: name != "data/masks.py"):  # the test names it
        runners = tuple(i for i, closure in enumerate(closures) if PACKAGE_ROOT / module in closure)
        if not runners:
            edited.append(module)
        elif runners not in chosen:
            chosen[runners] = module
            edited.append(module)
    return sorted(edited)


EDITED = _edited_modules()


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_the_closure_follows_lazy_relative_and_submodule_imports_and_skips_type_checking(tmp_path):
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg import b\n",
            "pkg/b.py": "from .sub import c\nimport json\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.d\nimport pkg.a\n",
            "pkg/d.py": "",
            "pkg/unused.py": "",
            "script.py": "from pkg.a import f\n",
        },
    )
    closure = {
        path.relative_to(tmp_path).as_posix() for path in import_closure(tmp_path / "script.py", package)
    }
    assert closure == {"pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py"}


def test_the_hash_changes_with_a_module_in_the_closure_and_not_with_one_outside(tmp_path):
    package = _package(
        tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "", "pkg/b.py": "", "s.py": "import pkg.a\n"}
    )
    before = code_hash(tmp_path / "s.py", package)
    (package / "b.py").write_text("# edited\n")
    assert code_hash(tmp_path / "s.py", package) == before
    (package / "a.py").write_text("# edited\n")
    assert code_hash(tmp_path / "s.py", package) != before


def _closure_names(script: str) -> set[str]:
    return {path.relative_to(PACKAGE_ROOT).as_posix() for path in import_closure(SCRIPTS / f"{script}.py")}


def test_training_runs_the_mask_rasteriser_and_no_inference_drawing_or_video_code():
    train = _closure_names("train")
    assert "data/masks.py" in train  # the training reader rasterises polygons with it
    assert not {name for name in train if name.startswith("infer/")}
    assert not {"cli.py", "report.py"} & train
    assert {name for name in _closure_names("infer") if name.startswith("train/")} == set()


def test_the_command_line_is_in_no_rules_closure():
    assert not any("cli.py" in _closure_names(script.stem) for script in SCRIPTS.glob("*.py"))


def _bytecode_imports(path: Path) -> set[str]:
    """d2retrain names the compiled file imports anywhere: an oracle independent of the AST walk."""
    names, pending = set(), [compile(path.read_bytes(), str(path), "exec")]
    while pending:
        code = pending.pop()
        pending += [constant for constant in code.co_consts if isinstance(constant, types.CodeType)]
        instructions = list(dis.get_instructions(code))
        for index, instruction in enumerate(instructions):
            if instruction.opname != "IMPORT_NAME" or not instruction.argval.startswith("d2retrain"):
                continue
            names.add(instruction.argval)
            for follower in instructions[index + 1 :]:
                if follower.opname == "IMPORT_FROM":
                    names.add(f"{instruction.argval}.{follower.argval}")
                elif not follower.opname.startswith("STORE_"):
                    break
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_import_the_interpreter_would_run_is_followed(module):
    """Every d2retrain import in the bytecode is followed (one under `if TYPE_CHECKING:` would fail)."""
    path = PACKAGE_ROOT / module
    found = set(imported_names(path, None))
    assert _bytecode_imports(path) <= found


# --- The workflow itself: every module edited in turn after a full run -------------------------


def _snakemake(workdir: Path, *args: str) -> str:
    command = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "-d", str(workdir)]
    command += ["--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    text = _snakemake(workdir, "--dry-run", *args)
    return {
        rule: int(count)
        for rule, count in re.findall(r"^(\w+)\s+(\d+)$", text, re.M)
        if rule not in ("total", "all")
    }


def _rule_scripts(workdir: Path, rules: set[str]) -> dict[str, str]:
    """Rule name -> entry script stem, read from the rule files (inference rules infer_NN run infer.py)."""
    scripts = {}
    for smk in (workdir / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"^(?=rule |checkpoint )", smk.read_text(), flags=re.M):
            named = re.match(r"(?:rule|checkpoint) (\w+):", block)
            script = re.search(r"\"\.\./scripts/(\w+)\.py\"", block)
            if named and script:
                scripts[named.group(1)] = script.group(1)
    scripts |= {rule: "infer" for rule in rules if re.fullmatch(r"infer_\d\d", rule)}
    assert set(scripts) >= rules, rules - set(scripts)
    return {rule: scripts[rule] for rule in rules}


@pytest.fixture(scope="module")
def full_run(main_run, tmp_path_factory):
    """The session's finished main job, copied beside a copy of the workflow and package (edited
    freely): a dry run there plans nothing until an edit."""
    workdir = copy_run(main_run, tmp_path_factory.mktemp("codehash") / "run")
    for name in ("Snakefile", "workflow", "src", "config", "envs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy(source, workdir / name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(main_config()))
    assert _planned_jobs(workdir) == {}
    graph = JobGraph(workdir)
    return workdir, _rule_scripts(workdir, set(graph.rule_of.values()) - {"all"}), graph


def _holders(workdir: Path, rule_scripts: dict[str, str], module: str) -> tuple[str, ...]:
    """The rules whose entry script's import closure holds the module."""
    package = workdir / "src" / "d2retrain"
    scripts = workdir / "workflow" / "scripts"
    return tuple(
        sorted(
            rule
            for rule, script in rule_scripts.items()
            if package / module in import_closure(scripts / f"{script}.py", package)
        )
    )


def _replanned_after_an_edit(workdir: Path, module: str) -> dict[str, int]:
    path = workdir / "src" / "d2retrain" / module
    original = path.read_bytes()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        return _planned_jobs(workdir)
    finally:
        path.write_bytes(original)


class JobGraph:
    """The job graph of a ``--forceall --dag``: what a ``--forcerun`` of some rules plans, computed
    from it (one graph instead of a dry run per group of rules)."""

    def __init__(self, workdir: Path) -> None:
        dot = _snakemake(workdir, "--forceall", "--dag", "dot")
        self.rule_of = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)', dot, re.M))
        self.children: dict[str, list[str]] = {job: [] for job in self.rule_of}
        for parent, child in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M):
            self.children[parent].append(child)

    def forced(self, rules: Iterable[str]) -> dict[str, int]:
        """Per rule, the jobs planned when ``rules`` are forced: theirs and every job downstream."""
        rules = set(rules)
        reached, pending = set(), [job for job, rule in self.rule_of.items() if rule in rules]
        while pending:
            job = pending.pop()
            if job not in reached:
                reached.add(job)
                pending += self.children[job]
        return dict(Counter(self.rule_of[job] for job in reached if self.rule_of[job] != "all"))


@pytest.fixture(scope="module")
def replanning(full_run):
    """Per module: (what a dry run plans after appending a comment to it, the jobs of the rules
    holding it and every job downstream in the job graph). Snakemake's start-up (~4 s) dominates
    each dry run, so they run two at a time, each lane on its own copy of the finished run (files,
    mtimes and .snakemake metadata)."""
    workdir, rule_scripts, graph = full_run
    lanes = [workdir, workdir.with_name(workdir.name + "_lane2")]
    shutil.copytree(workdir, lanes[1], symlinks=True)
    holders = {module: _holders(workdir, rule_scripts, module) for module in EDITED}
    free: queue.Queue[Path] = queue.Queue()
    for lane in lanes:
        free.put(lane)

    def run(module: str) -> dict[str, int]:
        lane = free.get()
        try:
            return _replanned_after_an_edit(lane, module)
        finally:
            free.put(lane)

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        results = dict(zip(EDITED, pool.map(run, EDITED), strict=True))
    return {module: (results[module], graph.forced(holders[module])) for module in EDITED}


@pytest.mark.slow
def test_the_job_graph_expectation_is_what_snakemake_plans_when_forced(full_run, replanning):
    """The oracle of the edits below, checked against Snakemake's own: --forcerun of the rules that
    run the mask rasteriser plans the jobs the job graph puts downstream of them."""
    workdir, rule_scripts, _ = full_run
    _, expected = replanning["data/masks.py"]
    holders = _holders(workdir, rule_scripts, "data/masks.py")
    assert {"train", "images_and_masks"} <= set(holders)
    assert _planned_jobs(workdir, "--forcerun", *holders) == expected


@pytest.mark.slow
@pytest.mark.parametrize("module", EDITED)
def test_editing_a_module_replans_exactly_the_rules_that_can_run_it_and_what_depends_on_them(
    replanning, module
):
    replanned, expected = replanning[module]
    assert replanned == expected
    if module == "cli.py":
        assert replanned == {}
    if module == "data/masks.py":
        assert {"train", "images_and_masks"} <= set(replanned)
