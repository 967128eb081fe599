"""The room under a cgroup memory limit, read the way the kernel lays it out (/proc/PID/cgroup and
mountinfo, the controller's files), on a copy of those files: v2 and v1, a limit on an ancestor only, a
container's subtree mount. The real kernel's files are read in tests/integration/test_split_memory.py."""

from __future__ import annotations

from dllama.net.memory import cgroup_room


def _tree(tmp, cgroup_line: str, mount: str, files: dict) -> str:
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup_line + "\n")
    (proc / "mountinfo").write_text(f"22 1 0:21 / /proc rw - proc proc rw\n{mount}\n")
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return str(proc)


def test_v2_limit_of_a_parent_slice_bounds_its_service(tmp_path):
    proc = _tree(tmp_path, "0::/dllama.slice/dllama-worker.service",
                 f"41 31 0:38 / {tmp_path}/cg rw,relatime - cgroup2 cgroup2 rw", {
                     "cg/dllama.slice/memory.max": "1000000\n", "cg/dllama.slice/memory.current": "400000\n",
                     "cg/dllama.slice/dllama-worker.service/memory.max": "max\n",
                     "cg/dllama.slice/dllama-worker.service/memory.current": "100000\n"})
    assert cgroup_room(proc) == 600000


def test_v2_tightest_level_wins_and_no_limit_is_none(tmp_path):
    proc = _tree(tmp_path, "0::/a/b", f"41 31 0:38 / {tmp_path}/cg rw - cgroup2 cgroup2 rw", {
        "cg/a/memory.max": "1000000", "cg/a/memory.current": "100000",
        "cg/a/b/memory.max": "300000", "cg/a/b/memory.current": "100000"})
    assert cgroup_room(proc) == 200000
    (tmp_path / "cg/a/b/memory.max").write_text("max\n")
    (tmp_path / "cg/a/memory.max").write_text("max\n")
    assert cgroup_room(proc) is None


def test_v1_memory_hierarchy_and_a_container_subtree_mount(tmp_path):
    # the mount shows /docker/abc as its root: the process's path is read relative to it
    proc = _tree(tmp_path, "4:memory:/docker/abc\n0::/",
                 f"35 31 0:32 /docker/abc {tmp_path}/mem rw - cgroup cgroup rw,memory", {
                     "mem/memory.limit_in_bytes": "536870912", "mem/memory.usage_in_bytes": "136870912"})
    assert cgroup_room(proc) == 400000000
    (tmp_path / "mem/memory.limit_in_bytes").write_text(str(9223372036854771712))
    assert cgroup_room(proc) is None


def test_usage_over_the_limit_leaves_no_room(tmp_path):
    proc = _tree(tmp_path, "0::/", f"41 31 0:38 / {tmp_path}/cg rw - cgroup2 cgroup2 rw",
                 {"cg/memory.max": "1000", "cg/memory.current": "5000"})
    assert cgroup_room(proc) == 0


def test_reclaimable_file_cache_counts_as_room(tmp_path):
    # a group that read a big model file: its usage is mostly inactive page cache, which the kernel gives
    # back under pressure (as MemAvailable counts it); only the rest is taken
    proc = _tree(tmp_path, "0::/w", f"41 31 0:38 / {tmp_path}/cg rw - cgroup2 cgroup2 rw", {
        "cg/w/memory.max": "1000000", "cg/w/memory.current": "900000",
        "cg/w/memory.stat": "anon 100000\nfile 800000\nactive_file 50000\ninactive_file 750000\n"})
    assert cgroup_room(proc) == 850000
    proc1 = tmp_path / "v1"
    proc1.mkdir()
    proc1 = _tree(proc1, "4:memory:/w", f"35 31 0:32 / {proc1}/mem rw - cgroup cgroup rw,memory", {
        "mem/w/memory.limit_in_bytes": "1000000", "mem/w/memory.usage_in_bytes": "900000",
        "mem/w/memory.stat": "cache 800000\ninactive_file 1\ntotal_inactive_file 700000\n"})
    assert cgroup_room(proc1) == 800000
