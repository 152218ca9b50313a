"""A systemd unit's sandbox, done by hand, for tests on machines where systemd is not running.

    argv = command(base, caps="-all,+net_admin", rw=[...], user="", argv=[...],
                   syscalls=syscall_group("@system-service"))
    ns.popen(argv, env=sandbox_env())

In a private mount namespace (`unshare --mount`), nothing outside changes:
- ProtectSystem=strict: /usr /etc /var /run /root /opt /boot /srv /home /work /tmp read-only,
  except `base` (the test's directory) and the ReadWritePaths= given as `rw`;
- ProtectKernelTunables=yes: /proc/sys read-only except the `rw` paths under it;
- ProtectProc=invisible: a fresh /proc with hidepid=invisible;
- ProtectHome=yes: /root empty, except the interpreter running these tests if it lives there;
- PrivateTmp=yes: an empty tmpfs on /var/tmp, named by TMPDIR;
- LimitCORE=0, User= (a uid; "" keeps root), NoNewPrivileges=yes, the capability sets
  (bounding, inheritable, ambient) from setpriv;
- SystemCallFilter= with SystemCallErrorNumber=EPERM: a seccomp filter (libseccomp through
  ctypes) allowing the system calls of the groups systemd-analyze lists, loaded last, just
  before the unit's command is executed, as systemd does.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest

SANDBOX = r"""
set -e
base=$1 caps=$2 rw=$3 user=$4; shift 4
mount --make-rprivate /
mount -t proc -o hidepid=invisible proc /proc
for p in /usr /etc /var /run /root /opt /boot /srv /home /work /tmp; do
  [ -d "$p" ] && mount --bind "$p" "$p" && mount -o remount,bind,ro "$p"
done
mount --bind "$base" "$base" && mount -o remount,bind,rw "$base"
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
for p in $rw; do
  [ -e "$p" ] || continue
  mount --bind "$p" "$p" && mount -o remount,bind,rw "$p"
done
# ProtectHome=yes: /root is empty. The interpreter running these tests may live under /root;
# it alone ($PYTUN_TEST_PYHOME) stays visible.
pyhome=${PYTUN_TEST_PYHOME:-}
if [ -n "$pyhome" ] && [ "${pyhome#/root/}" != "$pyhome" ]; then
  mount -n --bind "$pyhome" /mnt && mount -n -t tmpfs -o mode=0755 tmpfs /root
  mkdir -p "$pyhome" && mount -n --move /mnt "$pyhome"
fi
# PrivateTmp=yes: an empty, writable temporary directory (/var/tmp here, as this machine's
# /tmp holds the test's own files).
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
export TMPDIR=/var/tmp
ulimit -c 0
# /dev/net/tun as udev makes it on Debian (0666: opening it needs no root, TUNSETIFF needs
# CAP_NET_ADMIN); some containers have it 0600.
if [ -n "$user" ]; then
  mount -t tmpfs -o mode=0755 tmpfs /dev/net && mknod -m 0666 /dev/net/tun c 10 200
fi
exec setpriv ${user:+--reuid=$user --regid=$user --clear-groups} --bounding-set="$caps" \
    --inh-caps="$caps" --ambient-caps="$caps" --no-new-privs -- "$@"
"""

# Loads a seccomp filter allowing the system calls named in the file argv[1] (others fail with
# EPERM), then executes argv[2:].
SECCOMP_EXEC = r"""
import ctypes, errno, os, sys
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
SCMP_ACT_ALLOW = 0x7FFF0000
ctx = lib.seccomp_init(0x00050000 | errno.EPERM)
names = open(sys.argv[1]).read().split()
for name in names:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) != 0:
        sys.exit(f"seccomp: cannot allow {name}")
if lib.seccomp_load(ctx) != 0:
    sys.exit("seccomp: cannot load the filter")
os.execvp(sys.argv[2], sys.argv[2:])
"""


@functools.cache
def _groups() -> dict[str, list[str]]:
    """systemd-analyze syscall-filter: every group's members (names and nested @groups)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return {}
    out = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                         text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def syscall_group(*names: str) -> list[str]:
    """The system calls a `SystemCallFilter=` allow list of these groups permits."""
    groups = _groups()
    if not groups:
        if os.environ.get("PYTUN_REQUIRE_NETNS") == "1":
            pytest.fail("PYTUN_REQUIRE_NETNS=1 but this test needs systemd-analyze")
        pytest.skip("needs systemd-analyze (the system call groups)")
    seen: set[str] = set()
    out: set[str] = set()

    def add(name: str) -> None:
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                for member in groups[name]:
                    add(member)
        else:
            out.add(name)

    for name in names:
        add(name)
    return sorted(out)


def syscall_filter(lines) -> list[str]:
    """What the unit's SystemCallFilter= lines allow, in order: an allow list, then `~` lines
    taking groups or calls away."""
    allowed: set[str] = set()
    for line in lines:
        if line.startswith("~"):
            allowed -= set(syscall_group(*line[1:].split()))
        else:
            allowed |= set(syscall_group(*line.split()))
    return sorted(allowed)


def unit_caps(capabilities) -> str:
    """CapabilityBoundingSet= words as setpriv's capability list."""
    return "-all" + "".join(",+" + c.removeprefix("CAP_").lower() for c in sorted(capabilities))


def sandbox_env(**extra) -> dict:
    return {**os.environ, "PYTUN_TEST_PYHOME": sys.base_prefix, **extra}


def command(base, caps: str, rw, user, argv, *, syscalls=None) -> list[str]:
    """The argv running `argv` in the sandbox; `syscalls` (a list) turns the filter on, its file
    written into `base`."""
    argv = [str(a) for a in argv]
    if syscalls is not None:
        allow = os.path.join(str(base), "syscalls.allow")
        with open(allow, "w") as f:
            f.write("\n".join(syscalls) + "\n")
        argv = [sys.executable, "-c", SECCOMP_EXEC, allow, *argv]
    return ["unshare", "--mount", "sh", "-c", SANDBOX, "sh", str(base), caps, " ".join(rw),
            "" if user is None else str(user), *argv]


def free_uid() -> int:
    """A uid (and gid) no account or group on this machine uses: stands in for a unit's User=."""
    import grp
    import pwd
    for uid in range(64100, 65000):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
        except KeyError:
            return uid
    raise AssertionError("no free uid in 64100-64999")
