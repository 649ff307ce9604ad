"""Processes for the benchmark: start, pin, watch (CPU, RSS from /proc), stop.

Everything here reads /proc directly so that the harness needs nothing but
the standard library. CPU time is counted in clock ticks and RSS in bytes;
callers convert. The one exception is InstrCounter, which runs `perf stat`
(user-space instructions of the gateway) when perf is there.
"""

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER_READY = re.compile(rb"worker \d+ ready for connections")


def serving_processes(log_path, offset=0):
    """gomodel processes taking connections: the primary (which listens and deals connections
    round robin) and each worker whose readiness it logged, from byte `offset` of its log on
    (where this start's lines begin)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            return 1 + len(_WORKER_READY.findall(f.read()))
    except OSError:
        return 0


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
    return proc_times(pid)[0]


def proc_times(pid):
    """(L{proc_ticks}, its kernel share: stime+cstime) of one process, from one read of its stat."""
    f = _stat_fields(pid)
    if f is None:
        return 0, 0
    # fields 14..17 of stat; f[0] is field 3 (state)
    kernel = int(f[12]) + int(f[14])
    return int(f[11]) + int(f[13]) + kernel, kernel


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
        times = {p: proc_times(p) for p in descendants(tree_root)} if tree_root else {}
        self.tree_pids = {p: total for p, (total, _) in times.items()}
        self.tree = sum(self.tree_pids.values())
        self.tree_sys = sum(kernel for _, kernel in times.values())  # the kernel's part of it
        self.extra = {p: proc_ticks(p) for p in extra_pids if p}
        self.self_ = self_ticks()


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every `interval` seconds.

    The tree's membership is refreshed every `refresh` seconds (workers that a
    gateway forks are picked up). `peak` is the largest sum seen, `peak_by_pid`
    the largest RSS of each process; `series` holds (seconds since start,
    bytes) pairs.
    """

    def __init__(self, root, interval=0.2, refresh=1.0, keep_series=False):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.refresh = refresh
        self.keep_series = keep_series
        self.peak = 0
        self.peak_by_pid = {}
        self.series = []
        self._halt = threading.Event()
        self._pids = []
        self._t0 = time.monotonic()

    def sample(self):
        total = 0
        for p in self._pids:
            v = rss_bytes(p)
            total += v
            if v > self.peak_by_pid.get(p, 0):
                self.peak_by_pid[p] = v
        return total

    def peaks_mib(self):
        """Each process's peak RSS in MiB, the tree's root first, then by PID."""
        return [round(self.peak_by_pid[p] / 2 ** 20, 1)
                for p in sorted(self.peak_by_pid, key=lambda p: (p != self.root, p))]

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


def load_cmd(ctx, cmd):
    """cmd as a mock or load generator runs it: pinned to the load CPUs, and at
    SCHED_IDLE priority when ctx.load_idle (the scaling run's default)."""
    prio = ["chrt", "--idle", "0"] if ctx.load_idle else []
    return ["taskset", "-c", ctx.load_cpus] + prio + list(cmd)


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


# -- user-space instructions (perf stat)

PERF_EVENT = "instructions:u"
_perf_probe = {}


def perf_probe():
    """None when `perf stat -e instructions:u` counts here, else why not (checked once)."""
    if "reason" not in _perf_probe:
        _perf_probe["reason"] = _probe_perf()
    return _perf_probe["reason"]


def perf_version():
    try:
        return subprocess.run(["perf", "--version"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _probe_perf():
    if shutil.which("perf") is None:
        return "perf not installed"
    fd, out = tempfile.mkstemp(prefix="bench-perf-probe-", suffix=".txt")
    os.close(fd)
    try:
        r = subprocess.run(["perf", "stat", "-e", PERF_EVENT, "-x", ",", "-o", out, "true"], capture_output=True,
                           text=True, timeout=30, env=dict(os.environ, LC_ALL="C"))
        with open(out, errors="replace") as f:
            text = f.read()
    except (OSError, subprocess.SubprocessError) as e:
        return "perf stat failed: %s" % e
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    count, why = parse_perf_stat(text)
    if count is None:
        err = (r.stderr or "").strip().splitlines()
        if err and why == "no count in perf's output":
            why = "%s (rc %s)" % (err[-1][:200], r.returncode)
        return "perf stat -e %s does not count here: %s" % (PERF_EVENT, why)
    return None


_COUNT_RE = re.compile(r"^\s*([0-9][0-9,.' \u202f\u00a0]*)\s+" + re.escape(PERF_EVENT) + r"\b")


def parse_perf_stat(text, event=PERF_EVENT):
    """The count of `event` in perf stat's output, as (count, None), or (None, why).

    Reads both the CSV form (-x ,: `123456,,instructions:u,...`) and the
    human one (`   1,234,567      instructions:u`, thousands separators of any
    locale); `<not supported>` and `<not counted>` give None with that text."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or event not in line:
            continue
        fields = line.split(",")
        if len(fields) >= 3 and event in (f.strip() for f in fields[1:4]):
            # CSV (-x ,): value, unit, event, run time, percentage running, ...
            value = fields[0].strip()
            if value.startswith("<"):
                return None, "perf: %s" % value
            try:
                return int(float(value)), None
            except ValueError:
                return None, "perf: unreadable count %r" % value
        if line.startswith("<"):
            return None, "perf: %s" % line.split(">", 1)[0] + ">"
        m = _COUNT_RE.match(line)
        if m:
            digits = re.sub(r"[^0-9]", "", m.group(1))
            if digits:
                return int(digits), None
        return None, "perf: unreadable line %r" % line[:120]
    return None, "no count in perf's output"


def _drain(fd):
    """Read a non-blocking FIFO until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class InstrCounter:
    """`perf stat -e instructions:u` attached to a set of processes (all their
    threads, and whatever they fork or spawn afterwards), counting only
    between enable() and disable().

    perf starts with its counters disabled (`-D -1`) and takes `enable` and
    `disable` on a control FIFO, answering `ack` on another: attaching, which
    takes perf a while, happens before the window, and the count starts and
    stops within a millisecond of the harness's own CPU snapshots. perf runs
    pinned to `cpus` (the load CPUs). Every failure ends in `error` (the count
    is then None), never in an exception; stop() always ends perf: SIGINT,
    wait, SIGKILL by its PID only if it hangs."""

    ACK_TIMEOUT = 5.0

    def __init__(self, pids, cpus, workdir):
        self.pids = sorted({p for p in pids if p})
        self.cpus = cpus
        self.workdir = workdir
        self.proc = None
        self.count = None
        self.error = None
        self.enabled = False
        self._dir = None
        self._ctl = self._ack = None

    def start(self):
        """Attach (counters disabled). Returns self; check `error`."""
        if not self.pids:
            self.error = "no processes to count"
            return self
        why = perf_probe()
        if why:
            self.error = why
            return self
        try:
            self._dir = tempfile.mkdtemp(prefix="perf-", dir=self.workdir)
            ctl, ack = os.path.join(self._dir, "ctl"), os.path.join(self._dir, "ack")
            os.mkfifo(ctl)
            os.mkfifo(ack)
            # both ends held read-write by us: no open() blocks, and no EOF while perf attaches
            self._ctl = os.open(ctl, os.O_RDWR | os.O_NONBLOCK)
            self._ack = os.open(ack, os.O_RDWR | os.O_NONBLOCK)
            self.out = os.path.join(self._dir, "perf-stat.txt")
        except OSError as e:
            self._fail("perf control FIFOs: %s" % e)
            return self
        # perf gives up if one of the PIDs is gone by the time it attaches (a
        # short-lived child of the gateway): once more with the living ones
        for attempt in (1, 2):
            self.pids = [p for p in self.pids if _stat_fields(p) is not None]
            if not self.pids:
                self._fail("the gateway's processes are gone")
                return self
            cmd = ["perf", "stat", "-e", PERF_EVENT, "-x", ",", "-D", "-1", "--control", "fifo:%s,%s" % (ctl, ack),
                   "-p", ",".join(str(p) for p in self.pids), "-o", self.out]
            if self.cpus:
                cmd = ["taskset", "-c", str(self.cpus)] + cmd
            try:
                with open(os.path.join(self.workdir, "perf.log"), "ab") as log:
                    self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 env=dict(os.environ, LC_ALL="C"))
                # perf answers once it has attached and reads its control FIFO
                # ("disable" while disabled changes nothing; every perf with --control knows it)
                self._command("disable")
                return self
            except Exception as e:
                retry = attempt == 1 and self.proc is not None and self.proc.poll() is not None
                if not retry:
                    self._fail("perf did not start: %s (see perf.log)" % e)
                    return self
                self.proc.wait()
                self.proc = None
                _drain(self._ctl)  # the command the dead perf never read
        return self

    def _command(self, cmd):
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("perf exited (rc %s)" % (None if self.proc is None else self.proc.returncode))
        _drain(self._ack)  # stale acks; then ask and wait for the answer
        os.write(self._ctl, (cmd + "\n").encode())
        deadline = time.monotonic() + self.ACK_TIMEOUT
        got = b""
        while b"ack" not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("no ack from perf for %r within %.0f s" % (cmd, self.ACK_TIMEOUT))
            if self.proc.poll() is not None:
                raise RuntimeError("perf exited (rc %s) before answering %r" % (self.proc.returncode, cmd))
            r, _, _ = select.select([self._ack], [], [], min(left, 0.2))
            if r:
                try:
                    got += os.read(self._ack, 4096)
                except BlockingIOError:
                    pass

    def _fail(self, why):
        if self.error is None:
            self.error = why

    def enable(self):
        if self.error is None and self.proc is not None:
            try:
                self._command("enable")
                self.enabled = True
            except Exception as e:
                self._fail("perf enable: %s" % e)

    def disable(self):
        if self.error is None and self.proc is not None:
            if not self.enabled:
                self._fail("the window never started")
                return
            try:
                self._command("disable")
            except Exception as e:
                self._fail("perf disable: %s" % e)

    def stop(self):
        """End perf (always safe to call, once or more) and read the count.
        Returns the count, or None (see `error`)."""
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._fail("perf did not stop on SIGINT")
                    try:
                        p.kill()  # only the perf process we started, by its PID
                    except ProcessLookupError:
                        pass
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            if self.error is None:
                try:
                    with open(self.out, errors="replace") as f:
                        count, why = parse_perf_stat(f.read())
                except OSError as e:
                    count, why = None, "perf output unreadable: %s" % e
                if count is None:
                    self._fail(why)
                else:
                    self.count = count
        for fd in (self._ctl, self._ack):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._ctl = self._ack = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return self.count if self.error is None else None
