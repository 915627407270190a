"""uv.lock is the one list of versions: the test environment, the conda env and the image agree with it.

The conda environment and the image cannot be built here, so these tests read them: the env files as
YAML, the Dockerfile as its instructions (continuation lines joined, ARG defaults substituted, each
`pip install` split into requirements). The Dockerfile installs what a `uv export` of the lock gives;
these tests run that very command here, so what they check is what the image gets.
"""

import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "uv.lock"
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
EXACT_PIN = re.compile(r"==\s*[^*,;\s]+")
BASE_IMAGE = re.compile(
    r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-devel(@sha256:[0-9a-f]{64})?"
)
# `uv export` as tools/lock_exports.py and the Dockerfile run it (each adds its groups and extras).
EXPORT = ["--frozen", "--no-emit-project", "--no-hashes", "--no-header", "--no-annotate"]
DETECTRON2_URL = re.compile(r"git\+https://github\.com/facebookresearch/detectron2(\.git)?@([0-9a-f]{40})")
# The oldest GPU architecture each CUDA major release still compiles for (CUDA 13 dropped < 7.5).
OLDEST_ARCH = {12: (5, 0), 13: (7, 5)}


@dataclass
class PipInstall:
    """One `pip install` of the Dockerfile: its requirements (-r files expanded) and options."""

    requirements: list[Requirement] = field(default_factory=list)
    constraints: list[Requirement] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


def _pyproject_dependencies() -> list[Requirement]:
    with (REPO / "pyproject.toml").open("rb") as stream:
        return [Requirement(line) for line in tomllib.load(stream)["project"]["dependencies"]]


def _locked_version(name: str) -> str:
    """The one version uv.lock holds for NAME (its versions differ by Python for a few packages)."""
    lock = tomllib.loads(LOCK.read_text())
    versions = {
        package["version"]
        for package in lock["package"]
        if canonicalize_name(package["name"]) == canonicalize_name(name)
    }
    assert len(versions) == 1, f"uv.lock holds {name} at {sorted(versions) or 'no version'}"
    return versions.pop()


def _load_env(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pip_lines(env: dict) -> list[str]:
    sections = [entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict)]
    assert len(sections) == 1, "an env file needs exactly one pip: section"
    return sections[0]


def _exact_pins(requirements: list[Requirement]) -> dict[str, str]:
    """Name -> version of the requirements pinned with a single `==` (names normalised)."""
    pins = {}
    for requirement in requirements:
        (specifier, *others) = list(requirement.specifier) or [None]
        if specifier is not None and not others and specifier.operator == "==":
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _env_pins(path: Path) -> dict[str, str]:
    return _exact_pins([Requirement(line) for line in _pip_lines(_load_env(path))])


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuations joined, ARG defaults substituted."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            joined.append(pending.strip())
            pending = ""
    arguments, result = {}, []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        for name, value in arguments.items():
            rest = rest.replace("${" + name + "}", value)
        if keyword.upper() == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            arguments[name.strip()] = shlex.split(value)[0] if value.strip() else ""
        result.append((keyword.upper(), rest.strip()))
    return result


def _commands(arguments: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at `&&`."""
    commands, current = [], []
    for token in shlex.split(arguments):
        if token == "&&":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def _copied_sources() -> list[str]:
    """The repository paths the Dockerfile COPYs."""
    sources = []
    for keyword, arguments in _instructions():
        if keyword == "COPY":
            sources += [word for word in arguments.split() if not word.startswith("--")][:-1]
    return sources


def _pip_install_arguments(command: list[str]) -> list[str] | None:
    """The arguments after `pip install` in a command, or None if it installs nothing."""
    if "pip" not in command or command[command.index("pip") + 1 : command.index("pip") + 2] != ["install"]:
        return None
    return command[command.index("pip") + 2 :]


def _run_commands() -> list[list[str]]:
    """Every simple command of every RUN, in build order."""
    return [
        command
        for keyword, arguments in _instructions()
        if keyword == "RUN"
        for command in _commands(arguments)
    ]


def _uv(*arguments: str) -> str:
    """What the project's uv prints for ARGUMENTS, run in the repository."""
    assert UV is not None, "no uv in the test environment: set it up with tools/setup.sh"
    return subprocess.run([UV, *arguments], cwd=REPO, check=True, capture_output=True, text=True).stdout


def _dockerfile_uv_export(command: list[str]) -> tuple[str, str]:
    """(output file, text) of a Dockerfile's `uv export ... -o FILE`, run here on this repository's lock."""
    arguments, words, output = [], iter(command[2:]), None
    for word in words:
        if word in ("-o", "--output-file"):
            output = next(words)
        elif word == "--project":
            next(words)  # the image's copy of pyproject.toml and uv.lock: this repository's here
        else:
            arguments.append(word)
    assert output is not None, f"{shlex.join(command)}: writes no file"
    return output, _uv("export", *arguments)


def _image_files() -> dict[str, str]:
    """Files of the image these tests can know: the pins a `uv export` of the lock writes."""
    files = {}
    for command in _run_commands():
        if command[:2] == ["uv", "export"]:
            output, text = _dockerfile_uv_export(command)
            files[output] = text
    return files


def _requirements_file(text: str) -> list[Requirement]:
    return [Requirement(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _pip_installs() -> list[PipInstall]:
    """Every `pip install` of the Dockerfile, in build order."""
    files, installs = _image_files(), []
    for command in _run_commands():
        if (pip_arguments := _pip_install_arguments(command)) is None:
            continue
        install, words = PipInstall(), iter(pip_arguments)
        for word in words:
            if word in ("-r", "--requirement"):
                install.requirements += _requirements_file(files[next(words)])
            elif word in ("-c", "--constraint"):
                install.constraints += _requirements_file(files[next(words)])
            elif word.startswith("-"):
                install.options.append(word)
            elif not (word == "." or word.startswith(("/", "./"))):
                install.requirements.append(Requirement(word))
        installs.append(install)
    return installs


def _dockerfile_requirements() -> list[Requirement]:
    return [requirement for install in _pip_installs() for requirement in install.requirements]


def _detectron2_install() -> tuple[int, PipInstall, Requirement]:
    for index, install in enumerate(_pip_installs()):
        for requirement in install.requirements:
            if canonicalize_name(requirement.name) == "detectron2":
                return index, install, requirement
    raise AssertionError("the Dockerfile installs no detectron2")


def _environment_value(name: str) -> str:
    for keyword, arguments in _instructions():
        if keyword == "ENV":
            for assignment in shlex.split(arguments):
                key, _, value = assignment.partition("=")
                if key == name:
                    return value
    raise AssertionError(f"the Dockerfile sets no ENV {name}")


def _base_image() -> str:
    images = [arguments.split()[-1] for keyword, arguments in _instructions() if keyword == "FROM"]
    assert len(images) == 1, f"expected one FROM, found {images}"
    return images[0]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    prefixes = ["/".join(path.split("/")[:end]) for end in range(1, path.count("/") + 2)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def _assert_pyproject_dependencies_pinned(pins: dict[str, str], where: str) -> None:
    for dependency in _pyproject_dependencies():
        pin = pins.get(canonicalize_name(dependency.name))
        assert pin is not None, f"{where} pins no {dependency.name} (pyproject: {dependency})"
        assert dependency.specifier.contains(pin, prereleases=True), f"{where}: {dependency.name}=={pin}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_every_pyproject_dependency_is_pinned_in_each_conda_env(env_file):
    _assert_pyproject_dependencies_pinned(_env_pins(env_file), env_file.name)


def test_every_pyproject_dependency_is_pinned_in_what_the_dockerfile_installs():
    _assert_pyproject_dependencies_pinned(_exact_pins(_dockerfile_requirements()), "the Dockerfile")


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_each_conda_env_parses_and_uses_nodefaults_and_never_defaults(env_file):
    env = _load_env(env_file)
    assert isinstance(env, dict)
    assert "nodefaults" in env["channels"]
    assert "defaults" not in env["channels"]
    assert all("::" not in str(entry) for entry in env["dependencies"]), "a package names its own channel"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_each_conda_env_gives_every_package_a_version_and_installs_no_local_path(env_file):
    env = _load_env(env_file)
    conda_packages = [entry for entry in env["dependencies"] if isinstance(entry, str)]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+=\d[\w.*]*", entry) for entry in conda_packages), conda_packages
    for line in _pip_lines(env):
        requirement = Requirement(line)  # raises on `-e ..`, paths and options
        assert requirement.url is None, f"{line}: a URL or path, not a pin"
        assert EXACT_PIN.fullmatch(str(requirement.specifier)), f"{line}: not an exact pin"


def test_uv_lock_is_up_to_date_with_pyproject():
    result = subprocess.run([UV, "lock", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"uv.lock is stale; run tools/upgrade-lock.sh\n{result.stderr}"


def test_the_conda_env_is_what_tools_lock_exports_writes_from_the_lock():
    result = subprocess.run(
        [sys.executable, "tools/lock_exports.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_every_pip_line_of_each_conda_env_is_a_line_of_the_lock_export(env_file):
    exported = set(_uv("export", *EXPORT, "--no-dev").splitlines())
    pip_lines = _pip_lines(_load_env(env_file))
    assert set(pip_lines) <= exported, sorted(set(pip_lines) - exported)
    assert len(pip_lines) == len(set(pip_lines)), "a package listed twice"


def test_the_test_environment_has_every_locked_package_at_its_locked_version():
    """What tools/setup.sh --extra test installs is what uv.lock says, for this Python and platform."""
    differing, checked = [], 0
    for line in _uv("export", *EXPORT, "--extra", "test").splitlines():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (locked,) = _exact_pins([requirement]).values()
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        checked += 1
        if installed is None or Version(installed) != Version(locked):
            differing.append(f"{requirement.name}: locked {locked}, installed {installed or 'nothing'}")
    assert not differing, f"run tools/setup.sh --extra test: {differing}"
    assert checked > 50


def test_the_dockerfile_installs_every_locked_runtime_package_and_detectron2s_dependencies():
    installed = {str(requirement) for requirement in _dockerfile_requirements()}
    lines = _uv("export", *EXPORT, "--no-dev", "--extra", "detectron2").splitlines()
    exported = {str(Requirement(line)) for line in lines}
    assert exported <= installed, f"not installed by the Dockerfile: {sorted(exported - installed)}"
    assert "fvcore" in {canonicalize_name(Requirement(line).name) for line in lines}


def test_the_dockerfile_installs_uv_at_the_version_the_lock_holds():
    uv_installs = [
        requirement
        for requirement in _dockerfile_requirements()
        if canonicalize_name(requirement.name) == "uv"
    ]
    assert [str(requirement.specifier) for requirement in uv_installs] == [f"=={_locked_version('uv')}"]


def test_the_dockerfile_starts_from_the_pytorch_devel_tag_of_the_locked_torch_and_cuda():
    image = _base_image()
    match = re.fullmatch(BASE_IMAGE, image)
    assert match, f"{image}: not an exact pytorch/pytorch -devel tag"
    assert match.group(1) == _locked_version("torch"), f"the image brings torch {match.group(1)}"
    cuda = Version(_locked_version("nvidia-cuda-runtime"))
    assert (int(match.group(2)), int(match.group(3))) == (cuda.major, cuda.minor), (
        f"the image brings CUDA {match.group(2)}.{match.group(3)}, the locked torch wheels CUDA {cuda}"
    )


def test_the_detectron2_extra_satisfies_the_installed_detectron2s_own_requirements():
    try:
        requires = importlib.metadata.requires("detectron2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("detectron2 is not installed here; the lock's detectron2 extra cannot be compared")
    missing = []
    for requirement in map(Requirement, requires):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if not requirement.specifier.contains(_locked_version(requirement.name), prereleases=True):
            missing.append(str(requirement))
    assert not missing, f"uv.lock does not satisfy detectron2's {missing}"


def test_the_dockerfile_builds_detectron2_from_its_repository_at_a_full_commit():
    _, install, requirement = _detectron2_install()
    assert requirement.url is not None and DETECTRON2_URL.fullmatch(requirement.url), requirement
    assert "--no-build-isolation" in install.options
    assert "torch" in _exact_pins(install.constraints), "its build could swap the image's torch"


def test_the_dockerfile_installs_setuptools_below_81_before_detectron2():
    detectron2_index, _, _ = _detectron2_install()
    below_81 = [
        index
        for index, install in enumerate(_pip_installs())
        for requirement in install.requirements
        if canonicalize_name(requirement.name) == "setuptools"
        and requirement.specifier
        and not requirement.specifier.contains("81", prereleases=True)
    ]
    assert below_81, "the Dockerfile never asks for setuptools<81"
    assert min(below_81) < detectron2_index


def _tested_detectron2_commit() -> str | None:
    """The commit of the detectron2 the tests run with: from pip's record, or its source checkout."""
    try:
        direct_url = importlib.metadata.distribution("detectron2").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    origin = json.loads(direct_url or "{}")
    if "vcs_info" in origin:
        return origin["vcs_info"]["commit_id"]
    if origin.get("url", "").startswith("file://"):
        folder = origin["url"].removeprefix("file://")
        result = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None
    return None


def test_the_dockerfile_builds_detectron2_at_the_commit_the_tests_ran_with():
    commit = _tested_detectron2_commit()
    if commit is None:
        pytest.skip("no detectron2 installed from a known commit here to compare with")
    _, _, requirement = _detectron2_install()
    assert DETECTRON2_URL.fullmatch(requirement.url).group(2) == commit


def test_the_dockerfile_forces_cuda_operators_for_architectures_its_cuda_and_torch_support(monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    assert _environment_value("FORCE_CUDA") == "1"
    architectures = _environment_value("TORCH_CUDA_ARCH_LIST")
    cuda_major = int(BASE_IMAGE.fullmatch(_base_image()).group(2))
    for architecture in architectures.split(";"):
        version = tuple(int(part) for part in architecture.removesuffix("+PTX").split("."))
        assert version >= OLDEST_ARCH[cuda_major], f"CUDA {cuda_major} cannot build for {architecture}"
    assert architectures.endswith("+PTX"), "the newest architecture should carry PTX for later GPUs"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", architectures)
    assert _get_cuda_arch_flags()  # raises ValueError on an architecture torch does not know


def test_snakemake_hands_its_sys_path_to_script_jobs_so_they_import_the_workflow_src(tmp_path, monkeypatch):
    """The conda env does not install d2retrain: jobs find it through this path (see the env file)."""
    from snakemake.common import get_snakemake_searchpaths

    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert str(tmp_path) in get_snakemake_searchpaths()
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'sys.path.insert(0, str(Path(workflow.basedir) / "src"))' in common


def test_dockerignore_sends_what_the_dockerfile_copies_and_keeps_local_state_out():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in _copied_sources():
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        files = (
            [path]
            if path.is_file()
            else [file for file in path.rglob("*") if file.suffix in (".py", ".yaml")]
        )
        for file in files[:5]:
            relative = file.relative_to(REPO).as_posix()
            assert not _dockerignored(relative, patterns), f"{relative} is copied but ignored"
    for local in [
        ".venv/bin/python",
        "results/person_ball/model/model_final.pth",
        "resources/demo/train/000001.jpg",
        "logs/person_ball/train.log",
        ".snakemake/conda/abc.yaml",
        ".git/HEAD",
        "src/d2retrain/__pycache__/coco.cpython-311.pyc",
    ]:
        assert _dockerignored(local, patterns), f"{local} would be sent to the Docker daemon"
