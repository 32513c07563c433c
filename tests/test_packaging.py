"""The wheel carries registry.toml and every built-in plugin; registry.toml matches what the plugins register."""

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_contains_registry_and_plugins(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info",
                                                  "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("graftkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "graft/registry.toml" in names
    assert "graft/cli.py" in names and "graft/loop.py" in names
    registry = zipfile.ZipFile(wheel).read("graft/registry.toml").decode()
    assert registry == (ROOT / "registry.toml").read_text()
    from graft.registry import builtin_catalogue

    modules = {spec["module"] for table in builtin_catalogue().values() for spec in table.values()}
    for module in modules:
        path = module.replace(".", "/")
        assert path + ".py" in names or path + "/__init__.py" in names, module  # a module, or a plugin package
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert {"graft/plugins/distill/teacher.py", "graft/plugins/distill/cache.py"} <= names
    assert "graft = graft.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_registry_toml_matches_registered_builtins():
    from graft.registry import Registry, builtin_catalogue

    reg = Registry()
    registered = {(e.kind, e.name): (reg.plugins[e.plugin].module, e.summary)
                  for e in reg.list() if reg.plugins[e.plugin].source == "built-in"}
    catalogue = {(kind, name): (spec["module"], spec["summary"])
                 for kind, table in builtin_catalogue().items() for name, spec in table.items()}
    assert registered == catalogue
