"""Processes for the benchmark: start, pin, watch (CPU, RSS from /proc), stop.

Everything here reads /proc directly so that the harness needs nothing but
the standard library. CPU time is counted in clock ticks and RSS in bytes;
callers convert.
"""

import os
import signal
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_sockets(port):
    """TCP sockets in LISTEN state on `port` (any address), from /proc/net/tcp{,6}.
    Processes sharing a port with SO_REUSEPORT each hold their own, so this
    counts the processes that accept connections there."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except OSError:
            pass
    return n


def parse_cpus(spec):
    """'0', '0-3', '0,2-3' -> sorted list of ints."""
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return sorted(out)


def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data[data.rindex(b")") + 2:].split()


def proc_ticks(pid):
    """utime+stime+cutime+cstime of one process (children it reaped included)."""
    f = _stat_fields(pid)
    if f is None:
        return 0
    # fields 14..17 of stat; f[0] is field 3 (state)
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def ppid_map():
    """pid -> parent pid, for every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            out[int(name)] = int(f[1])
    return out


def descendants(root):
    """root and every process below it."""
    if root is None:
        return []
    children = {}
    for pid, ppid in ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_ticks(pids):
    """CPU ticks of a process tree. A process that exits and is reaped moves its
    time into its parent's cutime/cstime, so summing all four fields over the
    living tree counts each tick once."""
    return sum(proc_ticks(p) for p in pids)


def rss_bytes(pid):
    try:
        with open("/proc/%d/statm" % pid) as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return 0


def cpu_stat():
    """/proc/stat per CPU: {cpu_index: [user, nice, system, idle, iowait, irq, softirq, steal]}."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                out[int(parts[0][3:])] = [int(x) for x in parts[1:9]]
    return out


def busy(delta):
    """Busy ticks of a /proc/stat delta: user+nice+system+irq+softirq (a task's
    stime includes the softirq work done in its context, so irq time belongs on
    this side of the comparison)."""
    return delta[0] + delta[1] + delta[2] + delta[5] + delta[6]


def self_ticks():
    t = os.times()
    return int(round((t.user + t.system) * CLK_TCK))


class Snapshot:
    """CPU counters at one instant: per-CPU /proc/stat, a process tree, helpers."""

    def __init__(self, tree_root=None, extra_pids=()):
        self.t = time.monotonic()
        self.cpus = cpu_stat()
        # per process of the tree (the split over workers), and the sum
        self.tree_pids = {p: proc_ticks(p) for p in descendants(tree_root)} if tree_root else {}
        self.tree = sum(self.tree_pids.values())
        self.extra = {p: proc_ticks(p) for p in extra_pids if p}
        self.self_ = self_ticks()


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every `interval` seconds.

    The tree's membership is refreshed every `refresh` seconds (workers that a
    gateway forks are picked up). `peak` is the largest sum seen; `series`
    holds (seconds since start, bytes) pairs.
    """

    def __init__(self, root, interval=0.2, refresh=1.0, keep_series=False):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.refresh = refresh
        self.keep_series = keep_series
        self.peak = 0
        self.series = []
        self._halt = threading.Event()
        self._pids = []
        self._t0 = time.monotonic()

    def sample(self):
        return sum(rss_bytes(p) for p in self._pids)

    def run(self):
        last_refresh = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now - last_refresh >= self.refresh:
                self._pids = descendants(self.root)
                last_refresh = now
            v = self.sample()
            if v > self.peak:
                self.peak = v
            if self.keep_series:
                self.series.append((round(now - self._t0, 2), v))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)
        return self.peak


def tree_rss(root):
    return sum(rss_bytes(p) for p in descendants(root))


def spawn(cmd, log_path, env=None, cpus=None, cwd=None):
    """Start cmd (pinned to `cpus` with taskset when given), output to log_path."""
    if cpus:
        cmd = ["taskset", "-c", cpus] + list(cmd)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        log.close()


def stop_tree(proc, timeout=10.0):
    """SIGTERM the process we started, wait, then SIGKILL whatever of its tree
    is left, one PID at a time (only processes below the one we started)."""
    if proc is None or proc.poll() is not None:
        return
    pids = descendants(proc.pid)
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    # children that outlived their parent, and the parent itself if stuck
    alive = set(pids) | set(descendants(proc.pid) if proc.poll() is None else ())
    for pid in sorted(alive, reverse=True):
        if _stat_fields(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait4(proc):
    """Wait for proc and return (returncode, cpu ticks it used) from rusage."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(round((ru.ru_utime + ru.ru_stime) * CLK_TCK))
