"""The root-namespace guard every lab module uses: importing ``root_namespace_untouched`` into a
test module makes it autouse for that module. It asserts that the root namespace's links,
addresses, rules, routes, iptables and ipsets are identical before and after, that the module's
lab (``PREFIX`` of the module) left no namespace, and that no other namespace came or went —
except those of other labs (names ``<prefix>-...``, state in /run/xdsserver-lab/<prefix>), which
may run side by side on a developer's machine.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from xdsserver.lab.lab import Lab, owned_netns
from xdsserver.lab.netns import list_netns, run

TOOLS = ("ip", "iptables", "iptables-save", "iptables-restore", "ipset", "sysctl")
_LAB_STATE = Path("/run/xdsserver-lab")


def foreign_netns(prefix: str) -> list[str]:
    labs = {p.name for p in _LAB_STATE.iterdir()} if _LAB_STATE.is_dir() else set()
    labs.add(prefix)
    return [ns for ns in list_netns() if ns.split("-", 1)[0] not in labs]


def root_snapshot() -> dict[str, str]:
    cmds = {
        "links": ["ip", "-d", "link", "show"],
        "addrs": ["ip", "addr", "show"],
        "rules4": ["ip", "-4", "rule", "show"],
        "rules6": ["ip", "-6", "rule", "show"],
        "routes4": ["ip", "-4", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "iptables": ["iptables-save"],
        "ipsets": ["ipset", "list", "-n"],
    }
    out = {}
    for name, argv in cmds.items():
        text = run(None, argv, check=False)
        if name == "iptables":  # drop timestamps and packet counters
            text = "\n".join(re.sub(r"\[\d+:\d+\]", "", l) for l in text.splitlines() if not l.startswith("#"))
        out[name] = text
    return out


@pytest.fixture(scope="module", autouse=True)
def root_namespace_untouched(request):
    prefix = request.module.PREFIX
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"missing tools {missing}: run scripts/setup-lab (as root)"
    Lab(prefix=prefix).down()  # a stale lab from a crashed run
    before = root_snapshot()
    netns_before = foreign_netns(prefix)
    yield
    assert owned_netns(prefix) == []
    assert foreign_netns(prefix) == netns_before
    after = root_snapshot()
    for key in before:
        assert after[key] == before[key], f"root namespace {key} changed"


def lab_up(request, lab: Lab, timeout: float = 90) -> Lab:
    """Bring ``lab`` up for a module fixture; torn down at the end (also on failure), asserting
    that no namespace and none of its processes (the supervisor's restarts included) is left."""

    def down() -> None:
        procs = list(lab.refresh().values()) if lab.state_file.exists() else list(lab.procs.values())
        lab.down()
        assert owned_netns(lab.prefix) == [] and not [p for p in procs if p.alive()], "lab processes left running"

    request.addfinalizer(down)
    lab.up(timeout=timeout)
    return lab


def poll(pred, timeout: float, what: str, step: float = 0.05):
    """``pred()`` once truthy (its value), polled every ``step`` s; AssertionError after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(step)
