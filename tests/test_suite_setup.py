"""The test and benchmark commands the README and benchmarks/README.md give work as documented."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_skip_reasons_are_printed_once_with_how_to_install_verl(tmp_path):
    """`.[dev]` has no verl: the suite says so once in its summary, with the install lines CI uses,
    also under xdist (-n, as pytest.ini sets)."""
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "needs_verl = pytest.mark.skipif(True, reason='verl is not installed (CI installs verl 0.9.1 separately)')\n"
        "@needs_verl\ndef test_a(): pass\n"
        "@needs_verl\ndef test_b(): pass\n"
        "def test_c():\n    pytest.importorskip('verl_is_not_here_either')\n"
        "def test_d(): pass\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("2 x verl is not installed (CI installs verl 0.9.1 separately)") == 1, out
    assert out.count("1 x could not import 'verl_is_not_here_either'") == 1, out
    assert out.count("To run the verl tests, install verl as CI does: pip install --no-deps verl==0.9.1") == 1, out


def test_the_documented_benchmark_command_is_not_refused():
    """`pytest benchmarks/ --benchmark-enable --benchmark-only` (benchmarks/README.md, pytest.ini):
    pytest.ini's -n 2 made pytest-benchmark refuse it (exit status 4); benchmarks/conftest.py runs it
    on one process. Collect-only: the refusal came at configuration."""
    # as from a shell: not with the variables of the xdist worker this test may run in (pytest-benchmark
    # takes PYTEST_XDIST_WORKER for being one)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-enable", "--benchmark-only",
                             "--collect-only", "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "benchmarks/test_bench_smoke.py" in result.stdout
