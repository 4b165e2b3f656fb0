"""The snapshot path as a local attack surface: directories, files, refusals, staleness, cleanup.

Each case runs twice: as the test's own user (root here) and as an unprivileged user (uid 65534,
in a forked child that drops privileges), so "another user" is the other one of the two. A case
that needs to give a path to another user is skipped when the test cannot chown (not root).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moe_reuse.plugin.exporters.prometheus import SnapshotCollector
from moe_reuse.plugin.metrics_text import samples
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession
from moe_reuse.plugin.snapshot import (
    MAX_SNAPSHOT_BYTES,
    SnapshotRefused,
    encode,
    remove_stale_runs,
    scan_snapshots,
    snapshot_path,
    write_snapshot,
)

NOBODY = 65534
IS_ROOT = os.geteuid() == 0
RUN = "4000000-abcdef01"  # a run id whose pid cannot exist (above pid_max's 2**22)


def snap(rank: str = "0", layers: int = 2, experts: int = 4) -> dict[str, Any]:
    s = RecorderSession(
        RingLayout(layers, experts, 2, 8, 8), ByteModel((1,) * layers),
        labels={"model": "m", "engine": "0", "rank": rank}, info={"top_k": "2"},
        layer_ids=list(range(layers)), publish=lambda _: None,
    )
    s.totals.assignments[:] = 6
    return s.snapshot()


# ---- running a case as root and as an unprivileged user ------------------------------------------
def _as_uid(uid: int, fn: Callable[[], Any]) -> Any:
    """fn() in a forked child running as `uid`; its JSON result (or its exception text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001
            out, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        os.write(w, json.dumps(out, default=str).encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "error" in out:
        raise AssertionError(f"as uid {uid}: {out['error']}")
    return out["ok"]


class Who:
    """The user a case runs as, another user, and a private work directory of the first."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.uid = NOBODY if name == "unprivileged" else os.geteuid()
        self.other = 0 if name == "unprivileged" else NOBODY
        self.work = work

    def run(self, fn: Callable[[], Any]) -> Any:
        return _as_uid(self.uid, fn) if self.uid != os.geteuid() else fn()

    def give_away(self, path: Path) -> None:
        """Make `path` another user's (needs root)."""
        if not IS_ROOT:
            pytest.skip("chown to another user needs root")
        os.chown(path, self.other, self.other, follow_symlinks=False)

    def own(self, path: Path) -> None:
        if IS_ROOT:
            os.chown(path, self.uid, self.uid, follow_symlinks=False)


@pytest.fixture(params=["self", "unprivileged"])
def who(request: pytest.FixtureRequest) -> Any:
    if request.param == "unprivileged" and not IS_ROOT:
        pytest.skip("switching to an unprivileged user needs root")
    work = Path(tempfile.mkdtemp(prefix="moe-reuse-snap-"))  # under sticky /tmp, mode 0700
    w = Who(request.param, work)
    w.own(work)
    yield w
    subprocess.run(["rm", "-rf", str(work)], check=False)


def _refusal(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except SnapshotRefused as exc:
        return exc.reason
    return "accepted"


# ---- directories -------------------------------------------------------------------------------
def test_writer_creates_private_directories_and_files(who: Who) -> None:
    base = who.work / "base"

    def case() -> list[int]:
        write_snapshot(snapshot_path(base / RUN, "0", "0"), snap())
        f = snapshot_path(base / RUN, "0", "0")
        return [stat.S_IMODE(os.stat(p).st_mode) for p in (base, base / RUN, f)] + [
            os.stat(f).st_uid]

    assert who.run(case) == [0o700, 0o700, 0o600, who.uid]
    ranks = who.run(lambda: [r.snapshot["labels"]["rank"] for r in scan_snapshots(base / RUN).ranks])
    assert ranks == ["0"]
    if who.uid != os.geteuid():  # and the same files are refused by a reader of another user
        assert dict(scan_snapshots(base / RUN).refused) == {"foreign_owner": 1}


@pytest.mark.parametrize("attack, reason", [
    ("foreign_base", "foreign_owner"),
    ("foreign_run", "foreign_owner"),
    ("base_world_writable", "writable_by_others"),
    ("run_group_writable", "writable_by_others"),
    ("base_symlink", "symlink"),
    ("run_symlink", "symlink"),
    ("ancestor_not_sticky", "writable_by_others"),
])
def test_untrusted_directories_are_refused_by_writer_and_reader(who: Who, attack: str,
                                                                 reason: str) -> None:
    """Another user pre-creates (or loosens) the directory: nothing is written there or read."""
    parent = who.work / "shared"
    parent.mkdir()
    who.own(parent)
    base, run = parent / "base", parent / "base" / RUN
    if attack in ("foreign_base", "foreign_run", "base_world_writable", "run_group_writable",
                  "run_symlink", "ancestor_not_sticky"):
        base.mkdir(mode=0o700)
        who.own(base)
    if attack in ("foreign_run", "run_group_writable"):
        run.mkdir(mode=0o700)
        who.own(run)
    target = who.work / "elsewhere"
    target.mkdir(mode=0o700)
    who.own(target)
    if attack == "foreign_base":
        who.give_away(base)
    elif attack == "foreign_run":
        who.give_away(run)
    elif attack == "base_world_writable":
        base.chmod(0o777)
    elif attack == "run_group_writable":
        run.chmod(0o770)
    elif attack == "base_symlink":
        base.symlink_to(target)
    elif attack == "run_symlink":
        run.symlink_to(target)
    elif attack == "ancestor_not_sticky":
        parent.chmod(0o777)

    def case() -> dict[str, Any]:
        wrote = _refusal(lambda: write_snapshot(snapshot_path(run, "0", "0"), snap()))
        result = scan_snapshots(run)
        return {"wrote": wrote, "refused": dict(result.refused), "ranks": len(result.ranks),
                "target": os.listdir(target)}

    out = who.run(case)
    assert out == {"wrote": reason, "refused": {reason: 1}, "ranks": 0, "target": []}


def test_missing_directory_is_empty_not_refused(who: Who) -> None:
    out = who.run(lambda: dict(scan_snapshots(who.work / "none" / RUN).refused))
    assert out == {}


# ---- files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack, reason", [
    ("symlink", "symlink"),
    ("fifo", "not_a_regular_file"),
    ("directory", "not_a_regular_file"),
    ("too_large", "too_large"),
    ("group_writable", "writable_by_others"),
    ("foreign", "foreign_owner"),
    ("zip_bomb", "corrupt"),
    ("torn", "corrupt"),
])
def test_untrusted_rank_files_are_refused_and_the_rest_still_read(who: Who, attack: str,
                                                                   reason: str) -> None:
    run = who.work / "base" / RUN

    def setup() -> None:
        write_snapshot(snapshot_path(run, "0", "0"), snap("0"))

    who.run(setup)
    bad = snapshot_path(run, "0", "1")
    secret = who.work / "secret.npz"
    secret.write_bytes(encode(snap("9")))
    if attack == "symlink":
        bad.symlink_to(secret)
    elif attack == "fifo":
        os.mkfifo(bad, 0o600)  # opening it for reading would block a scrape forever
    elif attack == "directory":
        bad.mkdir(mode=0o700)
    elif attack == "too_large":
        with open(bad, "wb") as f:
            f.truncate(MAX_SNAPSHOT_BYTES + 1)  # sparse: costs nothing on disk
    elif attack == "group_writable":
        bad.write_bytes(encode(snap("1")))
        bad.chmod(0o620)
    elif attack == "foreign":
        bad.write_bytes(encode(snap("1")))
        who.give_away(bad)
    elif attack == "zip_bomb":
        with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("header.npy", b"\0" * (MAX_SNAPSHOT_BYTES + 1))
    elif attack == "torn":
        bad.write_bytes(b"PK\x03\x04torn")
    if attack not in ("foreign",):
        who.own(bad)

    def case() -> dict[str, Any]:
        t0 = time.monotonic()
        result = scan_snapshots(run)
        return {"ranks": [r.snapshot["labels"]["rank"] for r in result.ranks],
                "refused": dict(result.refused), "seconds": time.monotonic() - t0}

    out = who.run(case)
    assert (out["ranks"], out["refused"]) == (["0"], {reason: 1})
    assert out["seconds"] < 0.1


def test_writer_never_follows_a_planted_temporary_or_rank_symlink(who: Who) -> None:
    run = who.work / "base" / RUN
    victim = who.work / "victim"
    victim.write_text("keep me")
    who.own(victim)

    def case() -> str:
        write_snapshot(snapshot_path(run, "0", "0"), snap())
        p = snapshot_path(run, "0", "0")
        p.unlink()
        p.symlink_to(victim)  # the writer replaces the link itself, never writes through it
        write_snapshot(p, snap())
        return victim.read_text() + ("|link" if p.is_symlink() else "|file")

    assert who.run(case) == "keep me|file"


# ---- the collector on /metrics -----------------------------------------------------------------
def _scrape(collector: SnapshotCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(collector)  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    out = {}
    for s in samples(text):
        out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_counts_refusals_by_reason_and_keeps_serving(tmp_path: Path) -> None:
    run = tmp_path / "base" / RUN
    write_snapshot(snapshot_path(run, "0", "0"), snap("0"))
    (snapshot_path(run, "0", "1")).symlink_to(tmp_path)
    col = SnapshotCollector(lambda: run)
    _scrape(col)
    m = _scrape(col)
    assert m[("moe_reuse_snapshot_refused_total", (("reason", "symlink"),))] == 2  # per scrape
    assert m[("moe_reuse_snapshot_refused_total", (("reason", "too_large"),))] == 0
    assert ("moe_reuse_steps_total", (("engine", "0"), ("kind", "decode"), ("model", "m"),
                                      ("rank", "0"))) in m
    age = m[("moe_reuse_snapshot_age_seconds", (("engine", "0"), ("model", "m"), ("rank", "0")))]
    assert 0 <= age < 60


def test_collector_fault_is_counted_with_its_stage_and_scrape_still_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_reuse.plugin import faults

    run = tmp_path / "base" / RUN
    write_snapshot(snapshot_path(run, "0", "0"), snap("0"))
    monkeypatch.setenv(faults.ENV, "collector:2")
    faults.reset()
    try:
        col = SnapshotCollector(lambda: run)
        assert ("moe_reuse_tokens_total", (("engine", "0"), ("model", "m"), ("phase", "decode"),
                                           ("rank", "0"))) in _scrape(col)
        for n in (1, 2):
            m = _scrape(col)
            assert m[("moe_reuse_errors_total", (("stage", "collector"),))] == n
            assert not any(k[0] == "moe_reuse_tokens_total" for k in m)
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reset()


def test_collector_of_an_installed_but_unasked_plugin_exports_nothing(tmp_path: Path) -> None:
    class Frontend:
        config = None

    assert _scrape(SnapshotCollector(lambda: tmp_path / "base" / RUN, Frontend())) == {}


# ---- staleness: a writer killed with SIGKILL ---------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = {paths!r}
    from tests.test_snapshot import snap
    from moe_reuse.plugin.snapshot import snapshot_path, write_snapshot
    run, rank = Path(sys.argv[1]), sys.argv[2]
    while True:
        write_snapshot(snapshot_path(run, "0", rank), snap(rank))
        print("wrote", flush=True)
        time.sleep(0.1)
""")


def test_a_killed_writer_s_rank_is_not_exported_but_its_age_is(tmp_path: Path) -> None:
    run = tmp_path / "base" / RUN
    root = str(Path(__file__).parents[1])
    code = WRITER.format(paths=[root])
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), r],
                              stdout=subprocess.PIPE, text=True) for r in ("0", "1")]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "wrote\n"
        col = SnapshotCollector(lambda: run)
        m = _scrape(col)
        ranks = {dict(k[1])["rank"] for k in m if k[0] == "moe_reuse_steps_total"}
        assert ranks == {"0", "1"}
        procs[1].send_signal(signal.SIGKILL)  # no atexit, no cleanup: the file stays
        procs[1].wait()
        time.sleep(0.3)
        m = _scrape(col)
        ranks = {dict(k[1])["rank"] for k in m if k[0] == "moe_reuse_steps_total"}
        assert ranks == {"0"}
        ages = {dict(k[1])["rank"]: v for k, v in m.items()
                if k[0] == "moe_reuse_snapshot_age_seconds"}
        assert set(ages) == {"0", "1"} and ages["1"] >= 0.3
        assert snapshot_path(run, "0", "1").exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_rank_that_stops_refreshing_goes_stale_after_five_flush_intervals(tmp_path: Path) -> None:
    run = tmp_path / "base" / RUN
    s = snap("0")
    s["options"] = {"flush_interval_s": 3.0}
    write_snapshot(snapshot_path(run, "0", "0"), s)
    now = time.time()
    assert not scan_snapshots(run, now=now + 14).ranks[0].stale
    assert scan_snapshots(run, now=now + 16).ranks[0].stale
    status = {**snap("1"), "status_only": True}
    write_snapshot(snapshot_path(run, "0", "1"), status)  # written once, live while its writer is
    assert not scan_snapshots(run, now=now + 3600).ranks[1].stale


# ---- cleanup of dead servers' run directories --------------------------------------------------
def test_start_up_removes_run_directories_of_dead_servers_only(who: Who) -> None:
    base = who.work / "base"
    child = subprocess.Popen(["true"])
    child.wait()
    dead_pid = child.pid  # reaped: that pid is free (until reused, which a test run won't see)
    live = f"{os.getpid()}-0a0b0c0d"
    dead = f"{dead_pid}-0a0b0c0d"
    other_users = f"{dead_pid}-ffff0000"

    def setup() -> None:
        for run in (live, dead, other_users):
            write_snapshot(snapshot_path(base / run, "0", "0"), snap())
            (base / run / ".tmp-1-deadbeef").write_bytes(b"half written")
        (base / "notes.txt").write_text("not a run directory")
        (base / "4000001-aaaaaaaa").symlink_to(who.work)  # never followed

    who.run(setup)
    who.give_away(base / other_users)
    removed = who.run(lambda: remove_stale_runs(base))
    assert removed == [dead]
    left = sorted(os.listdir(base))
    assert left == sorted([live, other_users, "notes.txt", "4000001-aaaaaaaa"])
    assert os.listdir(who.work)  # the symlink's target is intact


def test_injected_snapshot_write_fault_writes_nothing_then_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_reuse.plugin import faults

    path = snapshot_path(tmp_path / "base" / RUN, "0", "0")
    monkeypatch.setenv(faults.ENV, "snapshot_write:1")
    faults.reset()
    try:
        with pytest.raises(faults.InjectedFault):
            write_snapshot(path, snap())
        assert not path.exists()
        write_snapshot(path, snap())
        assert [r.snapshot["labels"]["rank"] for r in scan_snapshots(path.parent).ranks] == ["0"]
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reset()


def test_a_scan_stops_at_its_byte_budget_and_counts_the_rest(tmp_path: Path) -> None:
    """Whatever the directory holds, one scan reads a bounded amount: the files past the budget
    are skipped and counted as over_budget, the ones before it are read."""
    d = tmp_path / "base" / RUN
    for r in range(6):
        write_snapshot(snapshot_path(d, "0", str(r)), snap(str(r)))
    size = (d / "e0-r0.npz").stat().st_size
    res = scan_snapshots(d, max_total_bytes=2 * size + size // 2)
    assert len(res.ranks) == 3  # reads until more than the budget is spent
    assert res.refused == {"over_budget": 3} and "left unread" in res.messages[0]
    res = scan_snapshots(d, budget_s=-1.0)  # a stalled file system: nothing read
    assert res.ranks == [] and res.refused == {"over_budget": 6}
