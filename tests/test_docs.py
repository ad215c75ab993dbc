"""The documentation: every page is in the navigation, and `mkdocs build --strict`
(tutorials executed, API reference from the docstrings) succeeds."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = ("binary-net", "estimator-plugin", "alq", "ste-equivalence", "deploy")


def test_every_docs_page_is_in_the_navigation_and_linked_from_the_readme():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    in_nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.M))
    assert pages == in_nav, (pages ^ in_nav)
    readme = (ROOT / "README.md").read_text()
    for name in TUTORIALS:
        assert f"docs/tutorials/{name}.md" in readme, name
        assert f"tutorials/{name}.md" in pages


@pytest.mark.slow
@pytest.mark.tf_only
def test_docs_build_strict_with_executed_tutorials(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    for name in TUTORIALS:
        page = (site / "tutorials" / name / "index.html").read_text()
        assert "Traceback" not in page and "exited with errors" not in page, name
    assert "identical predictions: True" in (site / "tutorials/deploy/index.html").read_text()
    binary = (site / "tutorials/binary-net/index.html").read_text()
    assert "kquant summary" in binary and "MACs by precision" in binary
    for figure_page in ("estimators", "tutorials/alq", "tutorials/ste-equivalence"):
        assert "data:image/png;base64," in (site / figure_page / "index.html").read_text()
    gallery = (site / "estimators/index.html").read_text()
    for name in ("ste", "clipped_ste", "htge", "approx_sign"):
        assert f"<h2 id=\"{name}\">" in gallery or f">{name}</h2>" in gallery, name
    reference = (site / "reference/layers/index.html").read_text()
    assert "QuantDense" in reference and "kernel_quantizer" in reference
