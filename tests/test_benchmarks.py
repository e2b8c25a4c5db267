"""benchmarks/run.py writes its results to an output folder outside the repository, never into tracked files."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run():
    path, had_models = list(sys.path), "models" in sys.modules
    spec = importlib.util.spec_from_file_location("jlrp_benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
        if not had_models:
            sys.modules.pop("models", None)  # benchmarks/models.py, imported by run.py
        sys.path[:] = path


def _tracked_benchmark_files():
    out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "benchmarks"], capture_output=True,
                         text=True)
    return out.stdout if out.returncode == 0 else None


def test_results_go_to_the_output_folder(run, tmp_path, monkeypatch):
    before = _tracked_benchmark_files()
    out = run.main(["--quick", "--only", "none", "--out", str(tmp_path / "bench")])  # no configuration: instant
    assert out == (tmp_path / "bench" / "results-quick.md").resolve()
    assert out.read_text().startswith("# jlrp benchmark (--quick)")
    assert out.with_suffix(".json").read_text().strip() == "[]"
    assert _tracked_benchmark_files() == before  # nothing in benchmarks/ changed
    # the default folder: XDG_CACHE_HOME, else the temporary directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run.output_dir(None) == (tmp_path / "cache" / "jlrp" / "benchmarks").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ROOT not in run.output_dir(None).parents


@pytest.mark.parametrize("inside", ["benchmarks", ".", "benchmarks/new"])
def test_output_inside_the_repository_is_refused(run, inside):
    with pytest.raises(SystemExit, match="inside the repository"):
        run.main(["--only", "none", "--out", str(ROOT / inside)])
    assert not (ROOT / "benchmarks" / "new").exists()


def test_no_run_output_in_the_repository():
    """Only the recorded run the README quotes (results.md, results.json) lives in benchmarks/."""
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("results*")) == ["results.json", "results.md"]
