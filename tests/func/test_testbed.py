"""What the machine-level tests stand on, tested itself: the namespace test bed
(``tests/testbed.py``) and the loopback-only namespace the AWS tests run in.

A test run can be killed at any moment (a CI timeout, Ctrl-C twice, the OOM killer):
each test here kills one at a bad moment and checks that nothing of it survives the next
session. Where a host cannot hold a bed, the tests that need one say "bed unavailable:
<why>": a skip, or a failure under CI (``DVCRAY_TEST_REQUIRE_BED``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testbed
from helpers import REPO, REQUIRE_BED_ENV, run_in_loopback_namespace, unavailable

TESTBED = REPO / "tests" / "testbed.py"


@pytest.fixture(autouse=True)
def _root_only():
    try:
        testbed.check_host()
    except testbed.BedUnavailable as exc:
        unavailable(str(exc))


def _netns_pids(name: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _bed_of(pid: int, timeout: float = 60) -> testbed.Bed:
    """The bed whose build runs in process ``pid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for bed in _beds():
            if bed.owner_pid == pid:
                return bed
        time.sleep(0.1)
    raise AssertionError(f"no bed of process {pid}")


def _build_paused_at(point: str, count: int) -> tuple[subprocess.Popen, testbed.Bed]:
    """``python tests/testbed.py up COUNT``, stopped at ``point`` of its build."""
    proc = subprocess.Popen([sys.executable, str(TESTBED), "up", str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, testbed.PAUSE_ENV: point})
    line = proc.stdout.readline()   # the build prints this line, then sleeps until killed
    assert line.strip() == f"PAUSED AT {point}", line + (proc.stdout.read() if proc.poll() is not None else "")
    return proc, _bed_of(proc.pid)


def _gone(bed: testbed.Bed, pids: list[int]) -> dict[str, object]:
    """What is left of ``bed`` on this machine (empty when nothing)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = {
        "processes": [p for p in pids if _alive(p)],
        "namespaces": [n.netns for n in bed.nodes if n.netns in names],
        "bridge": subprocess.run(["ip", "link", "show", bed.bridge], capture_output=True).returncode == 0,
        "folder": Path(bed.dir).exists(),
    }
    return {k: v for k, v in left.items() if v}


def test_a_build_killed_after_a_node_booted_but_before_it_was_recorded_leaves_nothing():
    """The node's init runs in its namespaces but bed.json does not name its pid yet:
    it is found by its network namespace, whose name was recorded before it was made."""
    build, bed = _build_paused_at("node-started", 2)
    n0 = bed.nodes[0].netns

    def sshd_up() -> bool:
        return any(_cmdline(p).split(b"\0")[0].startswith((b"sshd", b"/usr/sbin/sshd")) for p in _netns_pids(n0))

    deadline = time.monotonic() + 30
    while not sshd_up() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sshd_up(), "the node booted"
    pids = _netns_pids(n0)
    assert testbed.Bed.load(Path(bed.dir)).nodes[0].init_pid == 0, "and is not recorded"
    os.killpg(build.pid, signal.SIGKILL)      # the test run dies here
    build.wait()
    assert all(_alive(p) for p in pids), "killing the run alone leaves the node running"

    assert bed.id in testbed.sweep_stale()    # what the next session (or build) does
    assert _gone(bed, pids) == {}


def test_a_run_killed_with_its_bed_up_is_swept_when_the_next_session_starts(tmp_path):
    build, bed = _build_paused_at("built", 2)
    pids = [p for n in bed.nodes for p in _netns_pids(n.netns)]
    assert len({n.init_pid for n in bed.nodes}) == 2 and all(_alive(n.init_pid) for n in bed.nodes)
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    assert all(_alive(n.init_pid) for n in bed.nodes)

    # A new session that builds no bed: its start sweeps the dead run's.
    session = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(REPO / "tests" / "unit" / "test_params.py")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert session.returncode == 0, session.stdout[-3000:]
    assert _gone(bed, pids) == {}


def test_a_bed_whose_owner_pid_now_belongs_to_another_process_is_swept():
    """A pid is reused: the owner is the process with that pid *and* its start time."""
    other = subprocess.Popen(["sleep", "600"])
    beds = []
    try:
        started = testbed._start_ticks(other.pid)
        for name, start in (("recycled", started - 1), ("owned", started)):
            bed = testbed.Bed(id=f"t{os.getpid() % 10000:04d}{name[0]}", dir="", bridge="", subnet="",
                              owner_pid=other.pid, owner_start=start, venv=sys.prefix)
            bed.dir, bed.bridge = str(testbed.BEDS / bed.id), f"dvb{bed.id}"
            testbed.reserve(bed, 0)
            beds.append(bed)
        recycled, owned = beds
        swept = testbed.sweep_stale()
        assert recycled.id in swept and not Path(recycled.dir).exists()
        assert owned.id not in swept and Path(owned.dir).exists(), "a live owner keeps its bed"
    finally:
        other.kill()
        other.wait()
        for bed in beds:
            bed.teardown()


RESERVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import testbed
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
bed = testbed.Bed(id=sys.argv[3], dir=str(testbed.BEDS / sys.argv[3]), bridge="dvb" + sys.argv[3], subnet="",
                  owner_pid=int(sys.argv[4]), venv=sys.prefix, owner_start=int(sys.argv[5]))
try:
    testbed.reserve(bed, 0, choices=[int(x) for x in sys.argv[6].split(",")])
    print(bed.subnet)
except testbed.BedUnavailable as exc:
    print("unavailable:", exc)
"""


def test_builds_at_the_same_moment_never_take_the_same_subnet(tmp_path):
    """Other test sessions build beds at the same time: the /24 is reserved under a lock,
    against links, routes and every recorded bed."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    recorded = {json.loads((f / "bed.json").read_text()).get("subnet") for f in testbed.BEDS.glob("*")
                if (f / "bed.json").is_file()} if testbed.BEDS.is_dir() else set()
    free = [x for x in range(200, 255) if f"10.213.{x}." not in used and f"10.213.{x}" not in recorded][:4]
    assert len(free) == 4
    go = tmp_path / "go"
    me = str(os.getpid())
    ids = [f"c{os.getpid() % 10000:04d}{i}" for i in range(5)]
    procs = [subprocess.Popen([sys.executable, "-c", RESERVE, str(REPO / "tests"), str(go), bed_id, me,
                               str(testbed._start_ticks(os.getpid())), ",".join(map(str, free))],
                              stdout=subprocess.PIPE, text=True) for bed_id in ids]
    try:
        time.sleep(1)   # every one of them waits at the start line
        go.touch()
        answers = [p.communicate(timeout=60)[0].strip() for p in procs]
        subnets = [a for a in answers if a.startswith("10.213.")]
        assert sorted(subnets) == sorted(f"10.213.{x}" for x in free), answers
        assert [a for a in answers if a.startswith("unavailable:")] == \
            ["unavailable: no free /24 left in 10.213.0.0/16"], answers
    finally:
        for bed_id in ids:
            if (testbed.BEDS / bed_id / "bed.json").exists():
                testbed.Bed.load(testbed.BEDS / bed_id).teardown()


NEEDS_A_BED = """
from helpers import build_bed

def test_needs_a_bed():
    bed = build_bed(1)
    assert bed.teardown() == []
"""


@pytest.mark.parametrize("confined", ["user namespace", "no CAP_NET_ADMIN"])
def test_root_without_the_privileges_is_bed_unavailable_a_skip_or_under_ci_a_failure(tmp_path, confined):
    """Root inside an unprivileged container passes the uid check: the bed says why it
    cannot be built, instead of failing at ``ip link add``."""
    (tmp_path / "test_needs_a_bed.py").write_text(NEEDS_A_BED)
    prefix = {"user namespace": ["unshare", "--user", "--map-root-user"],
              "no CAP_NET_ADMIN": ["setpriv", "--bounding-set", "-net_admin"]}[confined]
    reason = {"user namespace": "root here is the root of a user namespace",
              "no CAP_NET_ADMIN": "root here lacks CAP_NET_ADMIN"}[confined]
    for required, outcome in (("0", "1 skipped"), ("1", "1 failed")):
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), REQUIRE_BED_ENV: required}
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                                 str(tmp_path / "test_needs_a_bed.py")], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stdout, _ = proc.communicate(timeout=300)
        assert outcome in stdout, stdout[-3000:]
        assert f"bed unavailable: {reason}" in stdout, stdout[-3000:]
        assert "Traceback" not in stdout and "RTNETLINK" not in stdout, stdout[-3000:]
        made = [b for b in _beds() if b.owner_pid == proc.pid]
        assert made == [], "nothing was made"


def _beds() -> list[testbed.Bed]:
    found = []
    for folder in testbed.BEDS.iterdir() if testbed.BEDS.is_dir() else []:
        try:
            found.append(testbed.Bed.load(folder))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return found


DAEMONS = """
import subprocess, sys, time
# As Ray and moto do: a child in a session of its own, and one in this one.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1] + "-child"],
                 start_new_session=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1] + "-child"])
print("started", flush=True)
time.sleep(600)
"""


def _marked(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_namespace_run_that_times_out_takes_every_process_it_started_with_it():
    marker = f"dvcray-leak-probe-{os.getpid()}-timeout"
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_loopback_namespace([sys.executable, "-c", DAEMONS, marker], timeout=10)
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []   # the children, and the namespace's init and unshare


STARTER = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import run_in_loopback_namespace
run_in_loopback_namespace([sys.executable, "-c", sys.argv[2], sys.argv[3]], timeout=600)
"""


def test_a_killed_test_run_takes_its_namespace_run_with_it():
    """What test_aws_suite_in_a_loopback_only_namespace does, killed mid-run: its moto
    server and Ray head (here: two sleepers, one in a session of its own) die too."""
    marker = f"dvcray-leak-probe-{os.getpid()}-killed"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(REPO / "tests"), DAEMONS, marker])
    try:
        deadline = time.monotonic() + 30
        while len(_marked(f"{marker}-child")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_marked(f"{marker}-child")) == 2
    finally:
        starter.kill()                        # the test run dies
        starter.wait()
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []
