"""The three commands behave like the tools operators already know.

`--version` prints `NAME VERSION` on stdout and exits 0; `--help` prints usage on stdout and
exits 0; a usage error exits 2 with usage on stderr; a failure is one line on stderr, exit 1.
Each is run as its own process, the way its console script runs it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from .conftest import skip_or_fail

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SCRIPTS = PYPROJECT["project"]["scripts"]  # name -> "module:function"


def module_of(name: str) -> str:
    module = SCRIPTS[name].partition(":")[0]
    if name == "pytun-client" and importlib.util.find_spec(module) is None:
        skip_or_fail("needs pytun-client, which is not installed")
    return module


def run(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module_of(name), *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


ALL = sorted(SCRIPTS)


def test_the_three_commands_are_console_scripts():
    assert set(SCRIPTS) == {"pytun-server", "pytun-admin", "pytun-client"}
    for name, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert module.startswith("pytun.") and function == "main", (name, target)


@pytest.mark.parametrize("name", ALL)
def test_version_prints_name_and_version_on_stdout(name):
    done = run(name, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{name} {VERSION}\n"
    assert done.stderr == ""


@pytest.mark.parametrize("name", ALL)
def test_help_prints_usage_on_stdout(name):
    done = run(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {name} ")
    assert "--version" in done.stdout
    assert done.stderr == ""


def test_admin_help_lists_the_operator_commands():
    done = run("pytun-admin", "--help")
    for command in ("init", "add-peer", "remove-peer", "disable-peer", "enable-peer",
                    "list-peers", "show"):
        assert command in done.stdout, command


def test_client_help_lists_up_down_status():
    done = run("pytun-client", "--help")
    for command in ("up", "down", "status"):
        assert command in done.stdout, command


@pytest.mark.parametrize("name, argv", [("pytun-admin", []), ("pytun-admin", ["no-such-command"]),
                                        ("pytun-server", ["--no-such-option"]),
                                        ("pytun-client", []), ("pytun-client", ["sideways"])])
def test_usage_errors_exit_2_with_usage_on_stderr(name, argv):
    done = run(name, *argv)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith(f"usage: {name} ")


def test_server_without_state_exits_1_with_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-state"
    env = {k: v for k, v in os.environ.items() if k != "PYTUN_STATE_DIR"}
    done = run("pytun-server", "--state-dir", str(missing), env=env)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pytun-server: ") and str(missing) in lines[0]
    assert "pytun-admin init" in lines[0]  # says what to do about it
    assert not missing.exists()  # and creates nothing


def test_server_reads_the_state_dir_from_the_environment(tmp_path):
    missing = tmp_path / "from-env"
    done = run("pytun-server", env={**os.environ, "PYTUN_STATE_DIR": str(missing)})
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and str(missing) in done.stderr, done.stderr


def test_admin_on_a_missing_state_dir_exits_1_with_one_line(tmp_path):
    done = run("pytun-admin", "--state-dir", str(tmp_path / "nothing"), "list-peers")
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("pytun-admin: error: ")


def test_client_up_with_a_missing_config_exits_1_with_one_line(tmp_path):
    done = run("pytun-client", "up", str(tmp_path / "nowhere.conf"),
               env={**os.environ, "PYTUN_RUN_DIR": str(tmp_path / "run")})
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("pytun-client: error: ") and "nowhere.conf" in done.stderr


def test_the_laptop_client_never_needs_hub_code():
    """pytun-client imports nothing from server/: a laptop's install could leave it out."""
    code = ("import sys; import pytun.client.main, pytun.client.tunnel, pytun.client.routes;"
            " print(sorted(m for m in sys.modules if m.startswith('pytun.server')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_operator_facing_error_shares_one_base_that_is_no_value_error():
    """A broad `except ValueError` around parsing never swallows one of them by accident,
    and every command prints any of them as one `PROG: error:` line (common/cli.run)."""
    from pytun.client import enroll, main as client_main, routes, runtime
    from pytun.common import config, control, linux
    from pytun.common.errors import PytunError
    from pytun.server import admin, hub, metrics, migrate, nat, policy, registry, state
    from pytun.server import main as server_main
    errors = [linux.LinuxError, config.ConfigError, control.ControlError, metrics.MetricsError,
              state.StateError, hub.StartupError, registry.RegistryError, admin.AdminError,
              policy.PolicyError, nat.NatError, migrate.MigrateError, client_main.ClientError,
              enroll.EnrollError, runtime.TunnelError, routes.PlanError,
              server_main.CleanupError]
    for error in errors:
        assert issubclass(error, PytunError) and not issubclass(error, ValueError), error
