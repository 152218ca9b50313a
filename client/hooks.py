"""wg-quick's PreUp, PostUp, PreDown and PostDown commands."""

from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger("pytun")

HOOK_TIMEOUT = 60.0  # seconds for each command


def run_hooks(kind: str, commands: list[str], ifname: str, *, stop_at_failure: bool = False
              ) -> list[str]:
    """wg-quick's PreUp/PostUp/PreDown/PostDown: each command through bash, in order, with %i
    replaced by the interface name. Returns one problem line per command that failed; with
    `stop_at_failure` (the Up hooks, as in wg-quick) the rest are then not run."""
    shell = shutil.which("bash") or "/bin/sh"
    problems = []
    for command in commands:
        command = command.replace("%i", ifname)
        log.info("%s: %s", kind, command)
        try:
            done = subprocess.run([shell, "-c", command], stdin=subprocess.DEVNULL,
                                  timeout=HOOK_TIMEOUT)
            failed = f"exit {done.returncode}" if done.returncode else None
        except subprocess.TimeoutExpired:
            failed = f"still running after {HOOK_TIMEOUT:g} s"
        except OSError as exc:
            failed = exc.strerror or str(exc)
        if failed:
            problems.append(f"{kind} command failed ({failed}): {command}")
            if stop_at_failure:
                break
    return problems
