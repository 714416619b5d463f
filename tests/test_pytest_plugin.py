"""The pytest plugin, used as another project would: the sample project in tests/sample_project
(its own server, its own tests, only the public API and the `migration` fixture) runs its suite
in a pytest of its own, the plugin loaded through its pytest11 entry point from the installed
package; its JUnit XML is read back."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from junitparser import Failure, JUnitXml, Skipped

from migrator.pytest_plugin import Migration

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_project")


def _pytest(cwd, tmp_path, env_ci=None):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if env_ci is not None:
        env["CI"] = env_ci
    junit = tmp_path / f"junit-{env_ci}.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                        "--basetemp", str(tmp_path / f"bt-{env_ci}"), "--junitxml", str(junit)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    (suite,) = list(JUnitXml.fromfile(str(junit)))
    return p, suite


def test_the_plugin_is_registered_through_its_entry_point():
    eps = [e for e in entry_points(group="pytest11") if e.name == "migrator"]
    assert [e.value for e in eps] == ["migrator.pytest_plugin"]


@pytest.mark.slow
def test_a_sample_project_checks_its_server_migrates(tmp_path):
    p, suite = _pytest(SAMPLE, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "migrator 0.1.0: `migration` fixture" in p.stdout        # loaded as a plugin
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (2, 0, 0, 0)
    assert sorted(c.name for c in suite) == ["test_kvcache_migrates_from_an_async_test",
                                             "test_kvcache_migrates_within_its_downtime_budget"]


CANNOT_TRACK = '''
import migrator.api
from migrator.kernel.probe import Capabilities, Feature

# (a kernel without write-protect, PAGEMAP_SCAN and soft-dirty cannot exist on this machine:
# the probe's answer is replaced, nothing else)
_no = Feature(False, "not in this kernel")
migrator.api._probe = lambda: Capabilities(**{k: _no for k in Capabilities.__dataclass_fields__})
'''

USES_FIXTURE = '''
import os

def test_it(migration):
    migration.run(pid=os.getpid(), regions=["[heap]"])
'''


@pytest.mark.slow
def test_it_skips_where_nothing_can_track_and_fails_under_ci(tmp_path):
    proj = tmp_path / "proj"
    (proj / "tests").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntestpaths = ['tests']\n")
    (proj / "tests" / "conftest.py").write_text(CANNOT_TRACK)
    (proj / "tests" / "test_x.py").write_text(USES_FIXTURE)
    p, suite = _pytest(proj, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:]
    (case,) = list(suite)
    (sk,) = case.result
    assert isinstance(sk, Skipped)
    assert sk.message.startswith("migrator cannot migrate here: neither userfaultfd write-protect")
    p, suite = _pytest(proj, tmp_path, env_ci="true")
    assert p.returncode == 1
    (case,) = list(suite)
    (f,) = case.result
    assert isinstance(f, Failure)
    assert "CI=true, so this fails instead of skipping" in f.message


async def test_run_inside_a_trio_test_says_to_await_run_async(tmp_path):
    m = Migration(str(tmp_path))
    with pytest.raises(RuntimeError, match="use `await migration.run_async"):
        m.run(pid=os.getpid(), regions=["[heap]"])


def test_an_unknown_policy_field_is_named(tmp_path):
    m = Migration(str(tmp_path))
    with pytest.raises(TypeError, match="unknown policy field\\(s\\) colour: MigrationPolicy has .*downtime_limit_ms"):
        m.run(pid=os.getpid(), regions=["[heap]"], colour="blue")
    with pytest.raises(TypeError, match="needs pid= and regions=, or guest="):
        m.run(pid=os.getpid())
