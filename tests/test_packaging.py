import re
import tomllib

from packaging.requirements import Requirement

from helpers.paths import REPO_ROOT


def pyproject_dependencies() -> list[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["dependencies"]


def environment_pip_requirements() -> list[str]:
    """Read the entries of environment.yml's pip list, without a YAML parser."""
    text = (REPO_ROOT / "environment.yml").read_text()
    pip_section = text.split("  - pip:\n", 1)[1]
    return re.findall(r"^      - (\S.*?)\s*$", pip_section, flags=re.MULTILINE)


def test_environment_matches_pyproject():
    requirements = environment_pip_requirements()
    assert requirements[-1] == "-e ."
    assert sorted(requirements[:-1]) == sorted(pyproject_dependencies())


def test_torch_range_admits_readme_pin():
    pins = set(re.findall(r"torch==([\w.]+)", (REPO_ROOT / "README.md").read_text()))
    assert len(pins) == 1, f"README.md pins torch to {sorted(pins)}; expected one version."

    torch = next(
        Requirement(dep) for dep in pyproject_dependencies() if Requirement(dep).name == "torch"
    )
    assert torch.specifier.contains(pins.pop())
