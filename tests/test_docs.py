"""The documentation runs: every ```python block of README.md and docs/guide/*.md, as written (the blocks of one
file share their state, in order, as a reader's session would), and the API reference builds with pdoc
without warnings."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


# One fresh interpreter runs every file, each in its own namespace, as a user would (no test fixtures, no
# float64 switch, nothing from the test session): blocks can change global state (e.g. jlrp.register_rule).
RUNNER = textwrap.dedent("""
    import json, sys, time, traceback
    results = {}
    for path, blocks in json.loads(sys.stdin.read()):
        namespace = {"__name__": "__main__"}
        results[path] = {"ran": 0, "error": None}
        start = time.process_time()
        for line, code in blocks:
            try:
                exec(compile(code, f"{path}:{line}", "exec"), namespace)
            except BaseException:
                results[path]["error"] = f"the block at {path}:{line} failed:\\n" + traceback.format_exc()
                break
            results[path]["ran"] += 1
        results[path]["cpu_s"] = time.process_time() - start
    print("JLRP-DOCS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """Runs the README and the guide in two interpreters at once (two cores: half the wall time)."""
    # XLA's lowest optimisation level: the examples' many tiny programs compile 2-4x faster (the code is unchanged)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())
    env.pop("JAX_ENABLE_X64", None)
    groups = [[p for p in DOCS if p.name == "README.md"], [p for p in DOCS if p.name != "README.md"]]
    procs = []
    for k, group in enumerate(groups):
        work = tmp_path_factory.mktemp(f"docs{k}")  # files the examples write land here
        payload = json.dumps([(str(p.relative_to(ROOT)), python_blocks(p)) for p in group])
        proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=work, env=env)
        procs.append((proc, payload))
    results = {}
    for proc, payload in procs:
        stdout, stderr = proc.communicate(payload, timeout=900)
        lines = [l for l in stdout.splitlines() if l.startswith("JLRP-DOCS ")]
        assert lines, f"the documentation runner crashed (exit {proc.returncode}):\n{stderr[-4000:]}"
        results.update(json.loads(lines[-1][len("JLRP-DOCS "):]))
    return results


def test_the_guide_exists():
    names = {p.name for p in DOCS}
    assert {"README.md", "index.md", "quickstart.md", "composites.md", "transformers.md", "custom-rules.md",
            "evaluation.md", "pictures.md"} <= names, names


def test_every_page_but_the_index_has_examples():
    assert [p.name for p in DOCS if not python_blocks(p)] == ["index.md"]


@pytest.mark.parametrize("doc", [str(p.relative_to(ROOT)) for p in DOCS if python_blocks(p)])
def test_code_blocks_run_as_written(doc, doc_run):
    results = doc_run
    blocks = python_blocks(ROOT / doc)
    r = results[doc]
    assert r["error"] is None, r["error"]
    assert r["ran"] == len(blocks)


def test_every_block_imports_what_it_uses():
    """A reader copies one block: it names its imports (jlrp, jax, jnp, np, nn, nnx) itself."""
    imports = {"jlrp": r"import jlrp", "jax": r"import jax\b", "jnp": r"import jax\.numpy as jnp",
               "np": r"import numpy as np", "nn": r"import flax\.linen as nn", "nnx": r"from flax import nnx"}
    missing = []
    for path in DOCS:
        for line, code in python_blocks(path):
            body = "\n".join(l.split("#")[0] for l in code.splitlines())
            for name, pattern in imports.items():
                if re.search(rf"(?<![\w.]){name}\.", body) and not re.search(pattern, code):
                    missing.append(f"{path.relative_to(ROOT)}:{line} uses {name} without importing it")
    assert not missing, "\n".join(missing)


def test_links_inside_the_repository_resolve():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT:
                broken.append(f"{path.relative_to(ROOT)} links outside the repository: {target}")
            # files other engineers are writing (docs/design.md, docs/evaluation.md) may not exist yet
            elif not resolved.exists() and resolved.name not in ("design.md", "evaluation.md"):
                broken.append(f"{path.relative_to(ROOT)} links to a missing file: {target}")
    assert not broken, "\n".join(broken)
    assert "../shared" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_api_reference_builds_without_warnings(tmp_path):
    """pdoc renders the public API (``pdoc jlrp --docformat google -o DIR``) with every warning an error."""
    pdoc = pytest.importorskip("pdoc", reason="pdoc (in the test extra) is not installed")
    import pdoc.render
    import warnings
    out = tmp_path / "api"
    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pdoc reports problems (unparsable annotations, ...) as warnings
        pdoc.pdoc("jlrp", output_directory=out)
    pages = {p.name for p in (out / "jlrp").glob("*.html")}
    assert {"image.html", "datasets.html", "rules.html", "composites.html"} <= pages, pages
    image_page = (out / "jlrp" / "image.html").read_text(encoding="utf-8")
    for name in ("method_grid", "token_html", "colorbar", "input_tile"):
        assert f'id="{name}"' in image_page, name
    assert "_src" not in {p.name for p in (out / "jlrp").iterdir()}  # internals stay out of the reference
