"""deploy/: the systemd units, sysctl and modules-load drop-ins, the Containerfile, the examples.

The units are read by a small parser (systemd's syntax: sections, repeated keys, `\\` line
continuations) and checked against the product: every command they name is a console script
of pyproject.toml whose parser accepts those arguments, and every /proc/sys file the code writes
is writable under ProtectKernelTunables. `systemd-analyze verify` runs where it exists. As root,
the hub runs with only the unit's capabilities and a read-only /proc/sys except ip_forward.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

import pytest

from pytun.common import config
from pytun.server import nat, state

from . import sandbox
from .conftest import require_installed, require_root, require_tools
from .netns import topology, wait_until  # noqa: F401 (fixture)

REPO = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SERVER_UNIT = DEPLOY / "systemd" / "pytun-server.service"
CLIENT_UNIT = DEPLOY / "systemd" / "pytun-client@.service"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost",
             "ExecReload")


# ---------------------------------------------------------------------------------- helpers


def parse_unit(path: pathlib.Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} keeping repeated keys in order, as systemd reads them."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m[1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}:{number}: not KEY=VALUE in a section"
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path}:{number}: bad key"
        current.append((key.strip(), value.strip()))
    assert not pending, f"{path}: ends in a line continuation"
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: dict, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert found, f"[{section}] has no {key}="
    return found[-1]


def words(unit: dict, section: str, key: str) -> set[str]:
    return {w for v in values(unit, section, key) for w in v.split()}


def exec_lines(unit: dict) -> list[tuple[str, str]]:
    return [(k, v) for k, v in unit["Service"] if k in EXEC_KEYS]


def command_of(line: str) -> tuple[str, list[str], str]:
    """'-/usr/local/bin/pytun-client down %i' -> ('pytun-client', ['down', '%i'], '-')."""
    prefix = re.match(r"[-@:+!]*", line)[0]
    argv = shlex.split(line[len(prefix):])
    return os.path.basename(argv[0]), argv[1:], prefix


def cli_parser(script: str) -> argparse.ArgumentParser:
    """The argparse parser behind a console script of pyproject.toml."""
    module_name, _, _ = SCRIPTS[script].partition(":")
    module = importlib.import_module(module_name)
    for name in ("build_parser", "_parser"):
        if hasattr(module, name):
            return getattr(module, name)()
    raise AssertionError(f"{module_name} has no build_parser() or _parser()")


def parse_cli(script: str, argv: list[str]) -> argparse.Namespace:
    parser = cli_parser(script)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{script} refuses {argv}: {err.getvalue().strip()}") from None


def client_cli() -> None:
    try:
        importlib.import_module(SCRIPTS["pytun-client"].partition(":")[0])
    except ImportError as exc:
        pytest.fail(f"pytun-client is named by deploy/systemd but cannot be imported: {exc}")


# ---------------------------------------------------------------------------------- the hub unit


def test_hub_unit_has_the_required_settings():
    unit = parse_unit(SERVER_UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert value(unit, "Install", "WantedBy") == "multi-user.target"
    svc = lambda key: value(unit, "Service", key)  # noqa: E731
    assert svc("Restart") == "on-failure"
    assert svc("StateDirectory") == "pytun"
    assert svc("UMask") == "0077"
    assert svc("DevicePolicy") == "closed"
    assert values(unit, "Service", "DeviceAllow") == ["/dev/net/tun rw"]
    assert svc("NoNewPrivileges") == "yes"
    assert svc("ProtectSystem") == "strict"
    assert svc("ProtectHome") == "yes"
    assert svc("PrivateTmp") == "yes"
    assert svc("LockPersonality") == "yes"
    assert words(unit, "Service", "RestrictAddressFamilies") == {
        "AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert words(unit, "Service", "CapabilityBoundingSet") == caps
    assert words(unit, "Service", "AmbientCapabilities") == caps
    # PrivateDevices= would hide /dev/net/tun behind a private /dev.
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])
    # The state directory the unit makes is the one the hub reads by default.
    assert os.path.join("/var/lib", svc("StateDirectory")) == state.DEFAULT_STATE_DIR
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    assert env.get("PYTUN_STATE_DIR", state.DEFAULT_STATE_DIR) == state.DEFAULT_STATE_DIR


def test_hub_unit_cleans_up_before_start_and_after_stop():
    unit = parse_unit(SERVER_UNIT)
    commands = {key: command_of(line) for key, line in exec_lines(unit)}
    assert commands["ExecStartPre"][:2] == ("pytun-server", ["--cleanup"])
    assert commands["ExecStart"][:2] == ("pytun-server", [])
    assert commands["ExecStopPost"][:2] == ("pytun-server", ["--cleanup"])


def test_every_sysctl_the_code_writes_is_writable_under_the_units():
    """ProtectKernelTunables makes /proc/sys read-only: each file written needs ReadWritePaths."""
    from pytun.client import routes
    for path, writes in ((SERVER_UNIT, list(nat.FORWARDING.values())),
                         (CLIENT_UNIT, [routes.SRC_VALID_MARK])):
        unit = parse_unit(path)
        if values(unit, "Service", "ProtectKernelTunables") in ([], ["no"]):
            continue
        writable = {w.lstrip("-") for w in words(unit, "Service", "ReadWritePaths")}
        for sysctl in writes:
            assert sysctl in writable, f"{path.name}: ReadWritePaths= lacks {sysctl}"


# ---------------------------------------------------------------------------------- the laptop unit


def test_client_unit_runs_one_config_per_instance():
    unit = parse_unit(CLIENT_UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    commands = {key: command_of(line) for key, line in exec_lines(unit)}
    assert commands["ExecStart"][:2] == ("pytun-client", ["up", "/etc/pytun/%i.conf"])
    name, args, prefix = commands["ExecStopPost"]
    assert (name, args) == ("pytun-client", ["down", "%i"])
    assert "-" in prefix, "down exits 1 after a clean stop; its status must be ignored"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert values(unit, "Service", "DeviceAllow") == ["/dev/net/tun rw"]
    assert "CAP_NET_ADMIN" in words(unit, "Service", "CapabilityBoundingSet")
    # One /run/pytun for every instance: stopping one must not delete the others' state.
    assert value(unit, "Service", "RuntimeDirectory") == "pytun"
    assert value(unit, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_client_down_after_a_clean_stop_exits_1_with_one_line(tmp_path):
    """Why ExecStopPost carries '-': nothing is up, and `down` says so."""
    client_cli()
    done = subprocess.run([sys.executable, "-m", "pytun.client.main", "down", "example"],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTUN_RUN_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "example" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("unit_path", [SERVER_UNIT, CLIENT_UNIT], ids=lambda p: p.name)
def test_every_command_is_a_console_script_that_accepts_its_arguments(unit_path):
    unit = parse_unit(unit_path)
    lines = exec_lines(unit)
    assert lines
    for key, line in lines:
        script, args, _ = command_of(line)
        path = shlex.split(line.lstrip("-@:+!"))[0]
        assert path == f"/usr/local/bin/{script}", f"{key}: {path}"  # where pip puts them
        assert script in SCRIPTS, f"{key}: {script} is not a console script of pyproject.toml"
        if script == "pytun-client":
            client_cli()
        args = [a.replace("%i", "example") for a in args]
        parsed = parse_cli(script, args)
        if script == "pytun-server":
            assert parsed.cleanup == ("--cleanup" in args)
        if script == "pytun-client":
            assert parsed.command == args[0]


@pytest.mark.netns
def test_the_cleanup_the_hub_unit_runs_works_in_a_fresh_namespace(topology, tmp_path):
    """ExecStartPre/ExecStopPost on a machine where no hub ever ran: exit 0, nothing changed."""
    require_tools("iptables-legacy-save")
    ns = topology.netns("clean")
    done = ns.run([sys.executable, "-m", "pytun.server.main", "--cleanup",
                   "--state-dir", str(tmp_path / "never-initialised")], check=False)
    assert done.returncode == 0, done.stderr
    assert ns.sysctl("net.ipv4.ip_forward") == "0"
    saved = ns.run("iptables-legacy-save").stdout  # the tables were opened, and are empty
    assert not [line for line in saved.splitlines() if line.startswith("-A")], saved
    assert "PYTUN" not in saved


# ---------------------------------------------------------------------------------- systemd-analyze


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    require_tools("systemd-analyze")
    analyze = shutil.which("systemd-analyze")
    # verify also checks that each command exists: point the units at this machine's scripts.
    where = {name: shutil.which(name) for name in ("pytun-server", "pytun-client")}
    if not all(where.values()):
        require_installed(f"console scripts not on PATH ({where}); run scripts/install-deps")
    copies = []
    for src, dst in ((SERVER_UNIT, "pytun-server.service"),
                     (CLIENT_UNIT, "pytun-client@example.service")):
        text = src.read_text()
        for name, path in where.items():
            text = text.replace(f"/usr/local/bin/{name}", path)
        (tmp_path / dst).write_text(text)
        copies.append(str(tmp_path / dst))
    done = subprocess.run([analyze, "verify", "--man=no", *copies], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "pytun" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


# ---------------------------------------------------------------------------------- installed

# The hub unit's Exec lines, run as its ExecStartPre, ExecStart and ExecStopPost would: from
# the installed commands, in systemd's bare environment, with /root and /home hidden
# (ProtectHome=yes) and this checkout hidden too, so an editable install, or a venv made on an
# interpreter under /root, fails here the way the real unit would fail. It runs in a private
# mount namespace and an anonymous network namespace (`unshare --mount --net`), which vanish
# with it: the hub's TUN device, firewall rules and ip_forward stay in there.
INSTALLED_HUB = r"""
set -u
hide=$1 log=$2 pre=$3 start=$4 post=$5
mount --make-rprivate /
for d in $hide; do
  [ -d "$d" ] && mount -t tmpfs -o size=1m,mode=0755 hidden "$d" || exit 90
done
[ -z "$(ls -A /root)" ] || exit 91
cd /
ip link set lo up
step() { name=$1; shift; "$@"; echo "== $name exit $?"; }
step ExecStartPre sh -c "$pre"
step init pytun-admin init --subnet 10.77.0.0/24 --endpoint vpn.example.com
sh -c "exec $start" 2>"$log" &
hub=$!
up=no
for _ in $(seq 300); do  # up to 30 s: it says "hub up" once it also handles SIGTERM
  kill -0 "$hub" 2>/dev/null || break
  if grep -qs "hub up" "$log"; then up=yes; break; fi
  sleep 0.1
done
echo "== hub up: $up"
kill -TERM "$hub" 2>/dev/null
wait "$hub"
echo "== ExecStart exit $?"
cat "$log" >&2
step ExecStopPost sh -c "$post"
"""


def installed_hub_lines() -> dict[str, str]:
    """The hub unit's command lines, with systemd's `-` and similar prefixes taken off."""
    unit = parse_unit(SERVER_UNIT)
    return {key: line.lstrip("-@:+!") for key, line in exec_lines(unit)}


@pytest.mark.netns  # an anonymous network namespace (unshare --net), nothing named
def test_the_hub_units_commands_run_from_the_installed_product_with_root_hidden(tmp_path):
    require_root("hides /root in a private mount namespace")
    require_tools("unshare", "ip")
    lines = installed_hub_lines()
    for key in ("ExecStartPre", "ExecStart", "ExecStopPost"):
        path = shlex.split(lines[key])[0]
        if not os.path.exists(path):
            require_installed(f"{path} is missing: run scripts/install-deps")
    unit = parse_unit(SERVER_UNIT)
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    state_dir = tmp_path / "state"
    env.update(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               PYTUN_STATE_DIR=str(state_dir), LANG="C.UTF-8")
    hide = ["/root", *(["/home"] if os.path.isdir("/home") else []), str(REPO)]
    done = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", INSTALLED_HUB, "sh", " ".join(hide),
         str(tmp_path / "hub.log"), lines["ExecStartPre"], lines["ExecStart"], lines["ExecStopPost"]],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd="/")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "No module named" not in out and "Traceback" not in out, out
    for step in ("ExecStartPre", "init", "ExecStopPost"):
        assert f"== {step} exit 0" in done.stdout.splitlines(), out
    assert "== hub up: yes" in done.stdout, out
    assert "== ExecStart exit 0" in done.stdout, out  # SIGTERM is a clean stop
    assert "hub up: pytun0 10.77.0.1/24" in done.stderr, out
# Measured with systemd 252 (Debian 12): before the dedicated user and these lines the hub unit
# scored 2.8 and the laptop unit 4.3.
EXPOSURE = {"pytun-server.service": 2.0, "pytun-client@example.service": 2.5}


def test_systemd_analyze_security_exposure(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for src, name in ((SERVER_UNIT, "pytun-server.service"),
                      (CLIENT_UNIT, "pytun-client@example.service")):
        (tmp_path / name).write_text(src.read_text())
        done = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        if "--offline" in done.stderr and "unrecognized" in done.stderr:
            pytest.skip("this systemd-analyze has no --offline (systemd 250 or later)")
        m = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d)", done.stdout)
        assert m, done.stdout[-2000:] + done.stderr
        assert float(m[1]) <= EXPOSURE[name], f"{name}: exposure {m[1]}"


# ---------------------------------------------------------------------------------- sandbox

def test_the_hub_runs_as_the_dedicated_user_the_sysusers_file_creates(tmp_path):
    unit = parse_unit(SERVER_UNIT)
    assert value(unit, "Service", "User") == value(unit, "Service", "Group") == "pytun"
    lines = [line.split() for line in (DEPLOY / "sysusers" / "pytun.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [(w[0], w[1]) for w in lines] == [("u", "pytun")]
    assert state.DEFAULT_STATE_DIR in lines[0]  # its home, not a directory it does not own
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed; the file was read by hand above")
    (tmp_path / "etc").mkdir()  # a scratch root: this machine's accounts are not touched
    subprocess.run([sysusers, f"--root={tmp_path}", str(DEPLOY / "sysusers" / "pytun.conf")],
                   check=True, capture_output=True, timeout=30)
    user = (tmp_path / "etc" / "passwd").read_text().split(":")
    assert user[0] == "pytun" and 0 < int(user[2]) < 1000  # a system user
    assert user[5:7] == [state.DEFAULT_STATE_DIR, "/usr/sbin/nologin\n"]


def test_no_proc_subset_while_the_hub_writes_sysctls():
    """ProcSubset=pid hides all of /proc/sys, so ip_forward could not be written (and systemd
    could not even set up ReadWritePaths= under it)."""
    unit = parse_unit(SERVER_UNIT)
    assert any(p.lstrip("-").startswith("/proc/sys/") for p in words(unit, "Service", "ReadWritePaths"))
    assert values(unit, "Service", "ProcSubset") in ([], ["all"])
    assert value(unit, "Service", "ProtectProc") == "invisible"
    assert value(unit, "Service", "LimitCORE") == "0"


@pytest.mark.netns
def test_the_hub_works_inside_the_units_sandbox_as_its_own_user(topology, tmp_path):
    require_tools("unshare", "setpriv", "wireguard-go", "wg", "iptables-legacy-save")
    from .hubnet import INET_HOST, PY, Hub, WgGoLaptop
    from .netns import ping

    unit = parse_unit(SERVER_UNIT)
    caps = sandbox.unit_caps(words(unit, "Service", "CapabilityBoundingSet"))
    rw = sorted(p.lstrip("-") for p in words(unit, "Service", "ReadWritePaths"))
    assert value(unit, "Service", "SystemCallErrorNumber") == "EPERM"
    syscalls = sandbox.syscall_filter(values(unit, "Service", "SystemCallFilter"))
    uid = sandbox.free_uid()  # stands in for User=pytun
    # The user must reach its state directory: not below pytest's root-only tmp_path.
    base = pathlib.Path(tempfile.mkdtemp(prefix="pytun-hub-", dir="/tmp"))
    os.chmod(base, 0o755)

    def sandboxed(ns, argv, user=uid, **kw):
        return ns.popen(sandbox.command(base, caps, rw, user, argv, syscalls=syscalls),
                        env=sandbox.sandbox_env(), **kw)

    class SandboxedHub(Hub):
        def start(self) -> None:
            # What StateDirectory= with User= does: when the directory is not the user's yet,
            # it and everything in it (what `pytun-admin init` wrote as root) become the user's.
            if os.stat(self.state_dir).st_uid != uid:
                for path in [self.state_dir, *(os.path.join(self.state_dir, f)
                                               for f in os.listdir(self.state_dir))]:
                    os.chown(path, uid, uid)
            log = open(self.log_path, "a")
            self.proc = sandboxed(self.ns, [PY, "-m", "pytun.server.main", "--state-dir",
                                            self.state_dir], stdout=log, stderr=subprocess.STDOUT)
            log.close()
            wait_until(self.running, timeout=15, what=f"the hub to answer ({self.log_path})")

    try:
        hub = SandboxedHub(topology, base, init_args=("--route", f"{INET_HOST}/32"))
        hub.start()
        status = pathlib.Path(f"/proc/{hub.proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s*{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
        assert re.search(r"^Groups:\s*$", status, re.M), status
        assert re.search(r"^CapEff:\s*0+3000$", status, re.M), status  # NET_ADMIN, NET_RAW only
        assert re.search(r"^NoNewPrivs:\s*1$", status, re.M)
        assert re.search(r"^Seccomp:\s*2$", status, re.M)  # the system call filter is on
        limits = pathlib.Path(f"/proc/{hub.proc.pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
        # CAP_NET_ADMIN in the namespace's user namespace is enough to write a net sysctl.
        assert hub.ns.sysctl("net.ipv4.ip_forward") == "1"
        sock = os.stat(hub.control_path)
        assert (sock.st_uid, oct(sock.st_mode & 0o777)) == (uid, "0o600")
        # root (pytun-admin) can use the control socket; another user cannot.
        assert hub.running()
        other = sandboxed(hub.ns, [PY, "-c", CONNECT, hub.control_path], user=uid + 1,
                          stdout=subprocess.PIPE, text=True)
        assert other.communicate(timeout=30)[0].strip() == "PermissionError"
        # The user can read no secret of the machine's.
        shadow = sandboxed(hub.ns, ["cat", "/etc/shadow"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        assert shadow.wait(30) != 0 and "Permission denied" in shadow.stderr.read()
        # The filter refuses what the hub never needs: lowering its own priority (@resources),
        # which any user may otherwise do.
        nice = sandboxed(hub.ns, [PY, "-c", "import os; os.setpriority(os.PRIO_PROCESS, 0, 5)"],
                         stderr=subprocess.PIPE, text=True)
        assert nice.wait(30) != 0 and "Operation not permitted" in nice.stderr.read()

        ns, _ = hub.connect_laptop()
        WgGoLaptop(ns, base, hub.add_peer("carol"))  # added by root while the hub runs
        assert wait_until(lambda: ping(ns, INET_HOST), timeout=10, what="NAT to the internet host")
        assert hub.stop() == 0
        assert hub.ns.sysctl("net.ipv4.ip_forward") == "0", hub.log()
        assert "PYTUN" not in hub.ns.run("iptables-legacy-save").stdout
        assert "error" not in hub.log().lower(), hub.log()
        # ExecStopPost= and ExecStartPre=, as the same user: nothing left to clean, exit 0.
        cleanup = sandboxed(hub.ns, [PY, "-m", "pytun.server.main", "--cleanup", "--state-dir",
                                     hub.state_dir], stderr=subprocess.PIPE, text=True)
        assert cleanup.wait(30) == 0, cleanup.stderr.read()
        # pytun-admin, as root, changes the registry while the hub is stopped; the hub starts
        # again as its user and serves the new peer.
        ns2, _ = hub.connect_laptop()
        WgGoLaptop(ns2, base, hub.add_peer("dave"))
        hub.start()
        assert wait_until(lambda: ping(ns2, INET_HOST), timeout=10, what="dave through the hub")
        assert hub.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


# ---------------------------------------------------------------------------------- drop-ins


def test_sysctl_drop_in_turns_forwarding_on():
    path = DEPLOY / "sysctl" / "99-pytun.conf"
    settings = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, sep, val = line.partition("=")
            assert sep, line
            settings[key.strip()] = val.strip()
    assert settings == {"net.ipv4.ip_forward": "1"}
    assert "/proc/sys/" + "net.ipv4.ip_forward".replace(".", "/") == nat.FORWARDING[4]
    assert "restore" in path.read_text()  # says the hub sets and restores it itself


def test_modules_load_names_the_legacy_iptables_core():
    path = DEPLOY / "modules-load" / "pytun.conf"
    modules = [l.strip() for l in path.read_text().splitlines()  # noqa: E741
               if l.strip() and not l.lstrip().startswith(("#", ";"))]
    assert "ip_tables" in modules
    assert all(re.fullmatch(r"[a-z0-9_]+", m) for m in modules)


# ---------------------------------------------------------------------------------- Containerfile


def _containerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_containerfile_copies_files_that_exist_and_builds_the_whole_package():
    steps = _containerfile()
    assert steps[0] == ("FROM", "debian:12-slim")
    run = " ".join(rest for inst, rest in steps if inst == "RUN")
    for package in ("iptables", "iproute2", "python3-pip"):
        assert re.search(rf"apt-get install[^&]*\b{package}\b", run), package
    assert re.search(r"pip install .*/src", run)
    copied = []
    for inst, rest in steps:
        if inst in ("COPY", "ADD"):
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert not source.startswith("--"), f"unexpected COPY flag {source}"
                assert (REPO / source).exists(), f"the Containerfile copies missing {source}"
                copied.append(source.rstrip("/"))
    # Everything the package build reads: pyproject.toml, the readme, every package directory.
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"],
              *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(copied), needed - set(copied)


def test_containerfile_runs_the_hub_with_its_state_volume_and_port():
    steps = dict(_containerfile())
    assert json.loads(steps["ENTRYPOINT"]) == ["pytun-server"]
    assert "pytun-server" in SCRIPTS
    assert json.loads(steps["VOLUME"]) == [state.DEFAULT_STATE_DIR]
    assert steps["EXPOSE"] == f"{state.HubSettings.__dataclass_fields__['listen_port'].default}/udp"
    text = (DEPLOY / "Containerfile").read_text()
    for option in ("--cap-add NET_ADMIN", "--cap-add NET_RAW", "--device /dev/net/tun",
                   "-p 51820:51820/udp", "-v pytun-state:/var/lib/pytun"):
        assert option in text, option


# ---------------------------------------------------------------------------------- examples


def test_example_hub_json_is_what_the_hub_reads():
    text = (DEPLOY / "examples" / "hub.json").read_text()
    settings = state.HubSettings.from_json(text)
    assert json.loads(settings.to_json()) == json.loads(text)


def test_example_laptop_config_parses_and_its_keys_are_marked_as_examples():
    path = DEPLOY / "examples" / "laptop.conf"
    text = path.read_text()
    parsed = config.parse(text, str(path))
    assert len(parsed.peers) == 1
    assert re.search(r"^# EXAMPLE", text, re.M)
    for key in ("PrivateKey", "PublicKey", "PresharedKey"):
        for line in re.findall(rf"^{key}\s*=\s*(\S+)", text, re.M):
            assert line.startswith("EXAMPLE"), f"{key} does not look like a placeholder"
    client_cli()
    from pytun.client import main as client_main
    client_main.load_config(str(path))  # exactly one peer, as pytun-client requires


def test_example_init_script_is_valid_shell_and_every_admin_command_parses():
    path = DEPLOY / "examples" / "init-hub.sh"
    subprocess.run(["sh", "-n", str(path)], check=True)
    text = path.read_text().replace("\\\n", " ")
    commands = [line.strip().lstrip("# ").strip() for line in text.splitlines()
                if re.match(r"^\s*#?\s*pytun-admin ", line)]
    assert any(c.startswith("pytun-admin init ") for c in commands)
    for command in commands:
        parse_cli("pytun-admin", shlex.split(command)[1:])
