#!/usr/bin/env python3
"""End-to-end load benchmark: wrk -> {one backend directly, balrs, HAProxy} -> 3 nginx backends.

    python bench/load.py [--duration 10] [--quick] [--only small,close,64k,1m] [--connections 50]

Prints, for each scenario and from ONE run, req/s (and MiB/s) for the backend alone, balrs and HAProxy,
the ratios balrs/direct and balrs/haproxy, balrs' CPU use and peak RSS; writes the same as JSON to
bench/results/last.json. See bench/README.md for what the numbers mean and the CPU pinning layout.

Every process started here binds 127.0.0.1 only, runs in its own session and is killed by its process
group id (never by name) when its part is done, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

SMALL_BODY = b"Hello, world\n"
SIZES = {"/64k": 64 * 1024, "/1m": 1024 * 1024}

# name -> (path, extra wrk args, description)
SCENARIOS: Dict[str, Tuple[str, List[str], str]] = {
    "small": ("/", [], "small response (13 B), keep-alive"),
    "close": ("/", ["-H", "Connection: close"], "small response, new connection per request"),
    "64k": ("/64k", [], "64 KiB responses, keep-alive"),
    "1m": ("/1m", [], "1 MiB responses, keep-alive"),
    "workers": ("/", [], "small response, keep-alive: balrs with workers = 1 and workers = 2, nothing pinned"),
    "strategies": ("/", [], "small response, keep-alive: balrs with every strategy (health bookkeeping on)"),
    "alog": ("/", [], "small response, keep-alive: balrs without and with the json access log to a file"),
    # TLS termination (ECDSA P-256, the same certificate for both proxies; plain HTTP to the backends).
    "t1": ("/", [], "TLS: small response, keep-alive"),
    "t2": ("/", ["-H", "Connection: close"], "TLS: small response, a new TLS connection (full handshake) per request"),
    "t3": ("/1m", [], "TLS: 1 MiB responses, keep-alive"),
}
TLS_SCENARIOS = ("t1", "t2", "t3")
# Not in the default run (--only strategies): nine more balrs runs.
DEFAULT_SCENARIOS = ["small", "close", "64k", "1m", "workers"]
STRATEGIES = ["round_robin", "least_connections", "weighted_least_connections", "least_response_time",
              "weighted_least_response_time", "power_of_two", "random", "ip_hash", "consistent_hash"]
TARGETS = ["direct", "balrs", "haproxy"]
WORKER_TARGETS = ["w1", "w2"]
LOG_TARGETS = ["balrs", "log"]  # the alog scenario: balrs, then balrs with [log] access = FILE, format = json

INSTALL_HINT = "install them with: apt-get install wrk haproxy nginx"


# ------------------------------------------------------------------------------------------ processes


class Procs:
    """The children started by this script; each in its own session, killed by process group."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: List[str], log_path: str, cwd: Optional[str] = None) -> subprocess.Popen:
        log = open(log_path, "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=cwd, start_new_session=True)
        finally:
            log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> Optional[int]:
        """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL it. Returns the exit code."""
        if p.poll() is None:
            _killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (children of the child), and the child itself if it ignored TERM.
        _killpg(p.pid, signal.SIGKILL)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p, grace=2.0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process %s exited with %s before listening on %d" % (proc.args, proc.returncode, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on 127.0.0.1:%d after %gs" % (port, timeout))


def pin(cpu: Optional[int], argv: List[str]) -> List[str]:
    if cpu is None or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", str(cpu)] + argv


def http_get(port: int, path: str, timeout: float = 10.0, tls: bool = False) -> Tuple[int, bytes]:
    """One GET on a fresh connection, with Connection: close; (status, body). ``tls``: over TLS, the
    certificate not verified (the benchmark's own)."""
    import http.client
    import ssl
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                        context=ssl._create_unverified_context()) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------- /proc sampling


def read_status_kib(pid: int, field: str) -> Optional[int]:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process, in seconds."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
        fields = data[data.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def system_cpu() -> Tuple[float, float]:
    """(user+nice+system, steal) CPU seconds of the whole machine, all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system = int(fields[1]), int(fields[2]), int(fields[3])
        steal = int(fields[8]) if len(fields) > 8 else 0
        return (user + nice + system) / hz, steal / hz
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def own_cpu(pids: List[int]) -> float:
    """CPU seconds used so far by this script, its reaped children (wrk) and the live ``pids``."""
    import resource
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    for pid in pids:
        total += cpu_seconds(pid) or 0.0
    return total


class NoiseMeter:
    """How busy the machine was with work that is not this benchmark's (other users of a shared box),
    and the hypervisor's steal time, over a measurement; both in % of one CPU."""

    def __init__(self, pids: List[int]) -> None:
        self.pids = pids

    def __enter__(self) -> "NoiseMeter":
        self.t0 = time.monotonic()
        self.sys0, self.steal0 = system_cpu()
        self.own0 = own_cpu(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        # wrk has been reaped inside the block, so its CPU time is in RUSAGE_CHILDREN and counts as ours.
        elapsed = max(1e-6, time.monotonic() - self.t0)
        sys1, steal1 = system_cpu()
        own1 = own_cpu(self.pids)
        self.other_percent = max(0.0, 100.0 * ((sys1 - self.sys0) - (own1 - self.own0)) / elapsed)
        self.steal_percent = 100.0 * (steal1 - self.steal0) / elapsed


class RssSampler:
    """Samples VmRSS of a process every ``interval`` seconds in a thread; ``max_kib`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        while True:
            v = read_status_kib(self.pid, "VmRSS")
            if v is not None and v > self.max_kib:
                self.max_kib = v
            if self._stop.wait(self.interval):
                return


# --------------------------------------------------------------------------------------------- wrk

_UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> Optional[float]:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * _TIME_UNITS[m.group(2)] if m else None


def parse_wrk(out: str) -> dict:
    """The numbers of a wrk run (wrk 4.x text output)."""
    r: dict = {"requests_per_s": None, "mib_per_s": None, "requests": None, "latency_avg_ms": None,
               "latency_p50_ms": None, "latency_p99_ms": None, "latency_max_ms": None,
               "non_2xx_3xx": 0, "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    if m:
        r["requests_per_s"] = float(m.group(1))
    m = re.search(r"^Transfer/sec:\s+([0-9.]+)([KMGT]?B)", out, re.M)
    if m:
        r["mib_per_s"] = float(m.group(1)) * _UNITS[m.group(2)] / 1024 ** 2
    m = re.search(r"^\s*(\d+) requests in", out, re.M)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        r["latency_avg_ms"] = _ms(m.group(1))
        r["latency_max_ms"] = _ms(m.group(3))
    for pct, key in (("50", "latency_p50_ms"), ("99", "latency_p99_ms")):
        m = re.search(r"^\s*%s%%\s+(\S+)" % pct, out, re.M)
        if m:
            r[key] = _ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        r["non_2xx_3xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    return r


def run_wrk(port: int, path: str, extra: List[str], seconds: int, connections: int,
            cpu: Optional[int], tls: bool = False) -> Tuple[dict, str]:
    argv = pin(cpu, ["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--timeout", "10s", "--latency"]
               + extra + ["%s://127.0.0.1:%d%s" % ("https" if tls else "http", port, path)])
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, text=True)
    try:
        out, _ = p.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        _killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        out += "\n[bench] wrk killed after %ds\n" % (seconds + 20)
    finally:
        if p.poll() is None:
            _killpg(p.pid, signal.SIGKILL)
            p.wait()
    return parse_wrk(out), out


# ------------------------------------------------------------------------------------------ configs


NGINX_CONF = """\
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{servers}
}}
"""

NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location = / {{ return 200 "Hello, world\\n"; }}
        location = /64k {{ try_files /64k =404; }}
        location = /1m {{ try_files /1m =404; }}
    }}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    # high, but within a hard fd limit of 20000 (HAProxy needs about 2 fds per connection)
    maxconn 8000
    log stderr format raw local0 warning

defaults
    mode http
    log global
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 60s
    timeout http-request 30s
    timeout http-keep-alive 120s

frontend fe
    bind 127.0.0.1:{port}{ssl}
    maxconn 8000
    default_backend be

backend be
    balance roundrobin
{servers}
"""

BALRS_INI = """\
[balancer]
listen = 127.0.0.1:{port}{tls_flag}
strategy = {strategy}
connect_timeout = 5s
header_timeout = 30s
client_timeout = 120s
backend_timeout = 60s
max_connections = 10000
drain_timeout = 2s
workers = {workers}

{tls}
{backends}
{routes}"""


def route_sections(n: int) -> str:
    """N [route] sections: N-1 the benchmark's requests do not match (by host and by path prefix, in
    turn), then a catch-all, as bench/callgrind.py --routes does."""
    out = []
    for i in range(n - 1):
        key = "host = svc%d.example.com" % i if i % 2 else "path_prefix = /svc%d/" % i
        out.append("[route r%d]\n%s\npool = default\n" % (i, key))
    if n:
        out.append("[route all]\npath_prefix = /\npool = default\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- the run


def tool_version(argv: List[str]) -> str:
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=10)
        return p.stdout.strip().splitlines()[0] if p.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def choose_cpus() -> Tuple[Optional[int], Optional[int], str]:
    """(proxy CPU, load/backends CPU, note)."""
    if not shutil.which("taskset"):
        return None, None, "taskset not found: nothing pinned"
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        return None, None, "only one CPU available: nothing pinned (proxy and load share it)"
    return cpus[0], cpus[1], "proxy on CPU %d; wrk and backends on CPU %d" % (cpus[0], cpus[1])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="balrs-bench-")
        self.proxy_cpu, self.load_cpu, self.pin_note = choose_cpus()
        self.backend_ports = [free_port() for _ in range(3)]
        if args.backend == "auto":
            self.backend_kind = "nginx" if shutil.which("nginx") else "python"
        else:
            self.backend_kind = args.backend
        self.has_haproxy = bool(shutil.which("haproxy"))
        self.notes: List[str] = []
        self.balrs_logs: List[str] = []
        self.backends: Optional[subprocess.Popen] = None

    # backends ---------------------------------------------------------------------------------------

    def start_backends(self) -> None:
        tmp = self.tmp
        if self.backend_kind == "nginx":
            www = os.path.join(tmp, "www")
            os.makedirs(www)
            for name, size in (("64k", SIZES["/64k"]), ("1m", SIZES["/1m"])):
                with open(os.path.join(www, name), "wb") as f:
                    f.write(os.urandom(size))
            for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(tmp, d))
            servers = "".join(NGINX_SERVER.format(port=p, tmp=tmp) for p in self.backend_ports)
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=tmp, servers=servers))
            argv = ["nginx", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "nginx-error.log")]
        else:
            self.notes.append("backends are bench/pybackend.py (asyncio, one process), which is "
                              "likely the bottleneck; the direct and proxy numbers understate the proxies")
            argv = [sys.executable, os.path.join(HERE, "pybackend.py")] + [str(p) for p in self.backend_ports]
        p = self.procs.start(pin(self.load_cpu, argv), os.path.join(tmp, "backends.log"))
        self.backends = p
        for port in self.backend_ports:
            wait_listening(port, p)
        # Every backend serves what it should.
        for port in self.backend_ports:
            self.check_target("backend %d" % port, port)

    def check_target(self, label: str, port: int, tls: bool = False) -> None:
        for path, size in [("/", len(SMALL_BODY))] + list(SIZES.items()):
            status, body = http_get(port, path, tls=tls)
            if status != 200 or len(body) != size:
                raise RuntimeError("%s: GET %s gave %d with %d bytes (expected 200 with %d)"
                                   % (label, path, status, len(body), size))

    # proxies ----------------------------------------------------------------------------------------

    def certificate(self) -> Tuple[str, str, str]:
        """(cert, key, cert+key) files: one ECDSA P-256 certificate both proxies serve."""
        crt, key, pem = (os.path.join(self.tmp, n) for n in ("bench.crt", "bench.key", "bench.pem"))
        if not os.path.exists(pem):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
                            "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", crt],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            with open(pem, "wb") as f:
                f.write(open(crt, "rb").read() + open(key, "rb").read())
        return crt, key, pem

    def start_balrs(self, tag: str, workers: int = 1, cpu: Optional[int] = -1,
                    strategy: str = "round_robin", checkout: str = ROOT,
                    tls: bool = False, access_log: bool = False) -> Tuple[subprocess.Popen, int, str]:
        port = free_port()
        backends = "\n".join("[backend b%d]\naddress = 127.0.0.1:%d\n" % (i + 1, p)
                             for i, p in enumerate(self.backend_ports))
        ini = os.path.join(self.tmp, "lb-%s.ini" % tag)
        with open(ini, "w") as f:
            tls_section = ""
            if tls:
                crt, key, _pem = self.certificate()
                tls_section = "[tls]\ncert = %s\nkey = %s\n" % (crt, key)
            f.write(BALRS_INI.format(port=port, backends=backends, workers=workers, strategy=strategy,
                                     routes=route_sections(self.args.routes if checkout == ROOT else 0),
                                     tls_flag=" tls" if tls else "", tls=tls_section))
            if access_log:
                f.write("\n[log]\naccess = %s\nformat = json\n" % os.path.join(self.tmp, "access-%s.log" % tag))
        log = os.path.join(self.tmp, "balrs-%s.log" % tag)
        # `python -m balrs` in the checkout's directory runs that tree's balrs.
        p = self.procs.start(pin(self.proxy_cpu if cpu == -1 else cpu, [sys.executable, "-m", "balrs", ini]),
                             log, cwd=checkout)
        wait_listening(port, p)
        return p, port, log

    def start_haproxy(self, tag: str, tls: bool = False) -> Tuple[subprocess.Popen, int, str]:
        port = free_port()
        servers = "\n".join("    server b%d 127.0.0.1:%d maxconn 4000" % (i + 1, p)
                            for i, p in enumerate(self.backend_ports))
        cfg = os.path.join(self.tmp, "haproxy-%s.cfg" % tag)
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(port=port, servers=servers,
                                       ssl=" ssl crt %s alpn http/1.1" % self.certificate()[2] if tls else ""))
        log = os.path.join(self.tmp, "haproxy-%s.log" % tag)
        p = self.procs.start(pin(self.proxy_cpu, ["haproxy", "-db", "-f", cfg]), log)
        wait_listening(port, p)
        return p, port, log

    # measuring --------------------------------------------------------------------------------------

    def measure(self, target: str, scenario: str) -> dict:
        path, extra, _desc = SCENARIOS[scenario]
        tls = scenario in TLS_SCENARIOS
        args = self.args
        proc: Optional[subprocess.Popen] = None
        log = None
        load_cpu = self.load_cpu
        if target == "direct":
            port = self.backend_ports[0]
        elif target == "balrs":
            proc, port, log = self.start_balrs(scenario, tls=tls)
        elif target == "base":
            proc, port, log = self.start_balrs(scenario + "-base", checkout=self.args.baseline, tls=tls)
        elif target == "log":
            proc, port, log = self.start_balrs(scenario + "-log", access_log=True)
        elif target in STRATEGIES:
            proc, port, log = self.start_balrs(scenario + "-" + target, strategy=target)
        elif target in WORKER_TARGETS:
            # Nothing pinned: two workers need both cores, which wrk and the backends share with them.
            proc, port, log = self.start_balrs(scenario + target, workers=int(target[1:]), cpu=None)
            load_cpu = None
        else:
            proc, port, log = self.start_haproxy(scenario, tls=tls)
        result: dict = {}
        try:
            if proc is not None:
                self.check_target(target, port, tls)
            run_wrk(port, path, extra, args.warmup, args.connections, load_cpu, tls)  # warm-up
            pid = proc.pid if proc is not None else None
            tree = [pid] + _children(pid) if pid else []
            cpu0 = _tree_cpu(tree) if pid else None
            t0 = time.monotonic()
            ours = ([self.backends.pid] if self.backends else []) + ([pid] if pid else [])
            with NoiseMeter(ours) as noise:
                if pid:
                    with RssSampler(pid) as sampler:
                        result, out = run_wrk(port, path, extra, args.duration, args.connections, load_cpu, tls)
                    result["peak_rss_mib"] = sampler.max_kib / 1024
                    hwm = read_status_kib(pid, "VmHWM")
                    result["vm_hwm_mib"] = hwm / 1024 if hwm is not None else None
                else:
                    result, out = run_wrk(port, path, extra, args.duration, args.connections, load_cpu, tls)
            elapsed = time.monotonic() - t0
            result["other_cpu_percent"] = noise.other_percent
            result["steal_percent"] = noise.steal_percent
            cpu1 = _tree_cpu(tree) if pid else None
            if cpu0 is not None and cpu1 is not None:
                result["cpu_percent"] = 100.0 * (cpu1 - cpu0) / elapsed
                n = (result.get("requests_per_s") or 0.0) * args.duration
                if n:
                    # CPU time per request: what the proxy costs independently of who else is busy.
                    result["cpu_us_per_request"] = (cpu1 - cpu0) / n * 1e6
            if proc is not None and proc.poll() is not None:
                result["died"] = proc.returncode
            result["wrk_output"] = out
        finally:
            if proc is not None:
                rc = self.procs.stop(proc)
                if target not in ("direct", "haproxy") and log:
                    result["exit_code"] = rc
                    with open(log, errors="replace") as f:
                        text = f.read()
                    result["log_problems"] = [ln for ln in text.splitlines()
                                              if re.search(r" (WARNING|ERROR|CRITICAL):|Traceback", ln)]
                    result["log_tail"] = text.splitlines()[-15:]
                    self.balrs_logs.append("== balrs, scenario %s ==\n%s" % (scenario, text))
        return result

    def run(self) -> dict:
        args = self.args
        all_targets = [t for t in TARGETS if t != "haproxy" or self.has_haproxy]
        if args.baseline:
            all_targets.insert(1, "base")
        if not self.has_haproxy:
            self.notes.append("haproxy not found: no HAProxy column (%s)" % INSTALL_HINT)
        self.start_backends()
        results: Dict[str, dict] = {}
        for name in args.only:
            results[name] = {}
            targets = (WORKER_TARGETS if name == "workers" else STRATEGIES if name == "strategies"
                       else LOG_TARGETS if name == "alog"
                       else [t for t in all_targets if t != "direct"] if name in TLS_SCENARIOS  # plain backends
                       else all_targets)
            for target in targets:
                print("  %-6s %-8s ..." % (name, target), end="", flush=True)
                r = self.measure(target, name)
                results[name][target] = r
                print(" %s req/s%s" % (_fmt(r.get("requests_per_s"), 0),
                                       "" if not _errors(r) else "  (errors: %s)" % _errors(r)), flush=True)
            results[name]["ratios"] = {
                "balrs/direct": _ratio(results[name], "balrs", "direct"),
                "balrs/haproxy": _ratio(results[name], "balrs", "haproxy"),
                "base/haproxy": _ratio(results[name], "base", "haproxy"),
                "balrs/base": _ratio(results[name], "balrs", "base"),
                "w2/w1": _ratio(results[name], "w2", "w1"),
                "log/balrs": _ratio(results[name], "log", "balrs"),
                # HAProxy's CPU per request over balrs': the throughput ratio if each proxy had a core
                # of its own and nothing else were the limit.
                "cpu_efficiency": _cpu_ratio(results[name]),
            }
        return results


def _ratio(res: dict, a: str, b: str) -> Optional[float]:
    x = res.get(a, {}).get("requests_per_s")
    y = res.get(b, {}).get("requests_per_s")
    return x / y if x and y else None


def _cpu_ratio(res: dict) -> Optional[float]:
    b = res.get("balrs", {}).get("cpu_us_per_request")
    h = res.get("haproxy", {}).get("cpu_us_per_request")
    return h / b if b and h else None


def _tree_cpu(pids: List[int]) -> float:
    """CPU seconds used so far by the proxy's processes (a balrs supervisor and its workers)."""
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def _children(pid: int) -> List[int]:
    """Worker processes of a balrs supervisor (its direct children)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _errors(r: dict) -> str:
    parts = []
    se = r.get("socket_errors") or {}
    parts += ["%s %d" % (k, v) for k, v in se.items() if v]
    if r.get("non_2xx_3xx"):
        parts.append("non-2xx/3xx %d" % r["non_2xx_3xx"])
    if r.get("requests_per_s") is None:
        parts.append("no wrk result")
    if r.get("died") is not None:
        parts.append("process exited %s" % r["died"])
    return ", ".join(parts)


def _fmt(x: Optional[float], digits: int = 1) -> str:
    if x is None:
        return "-"
    return "{:,.{d}f}".format(x, d=digits)


def print_table(results: Dict[str, dict], has_haproxy: bool) -> str:
    lines = []
    hdr = ["scenario", "direct req/s", "balrs req/s"]
    if has_haproxy:
        hdr.append("haproxy req/s")
    hdr += ["balrs/direct"]
    if has_haproxy:
        hdr.append("balrs/haproxy")
    hdr += ["MiB/s direct / balrs" + (" / haproxy" if has_haproxy else ""),
            "balrs p50 / p99 ms", "balrs CPU", "CPU us/req balrs" + (" / haproxy" if has_haproxy else ""),
            "balrs peak RSS", "other load d / b / h"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|")
    for name, res in results.items():
        if name in ("workers", "strategies", "alog"):
            continue
        d, b, h = res.get("direct", {}), res.get("balrs", {}), res.get("haproxy", {})
        row = [name, _fmt(d.get("requests_per_s"), 0), _fmt(b.get("requests_per_s"), 0)]
        if has_haproxy:
            row.append(_fmt(h.get("requests_per_s"), 0))
        r = res["ratios"]
        row.append(_fmt(r["balrs/direct"], 2))
        if has_haproxy:
            row.append(_fmt(r["balrs/haproxy"], 2))
        mibs = [_fmt(d.get("mib_per_s")), _fmt(b.get("mib_per_s"))]
        if has_haproxy:
            mibs.append(_fmt(h.get("mib_per_s")))
        row.append(" / ".join(mibs))
        row.append("%s / %s" % (_fmt(b.get("latency_p50_ms"), 2), _fmt(b.get("latency_p99_ms"), 2)))
        row.append(_fmt(b.get("cpu_percent"), 0) + "%" if b.get("cpu_percent") is not None else "-")
        row.append(" / ".join(_fmt(x.get("cpu_us_per_request")) for x in ([b, h] if has_haproxy else [b])))
        row.append(_fmt(b.get("peak_rss_mib")) + " MiB" if b.get("peak_rss_mib") else "-")
        row.append(" / ".join("%s%%" % _fmt(x.get("other_cpu_percent"), 0) if x.get("other_cpu_percent") is not None
                              else "-" for x in ([d, b, h] if has_haproxy else [d, b])))
        lines.append("| " + " | ".join(row) + " |")
    st = results.get("strategies")
    if st:
        base = st.get("round_robin", {})
        lines.append("")
        lines.append("| strategy (small, keep-alive) | req/s | vs round_robin | CPU us/req |")
        lines.append("|---|---:|---:|---:|")
        for name in STRATEGIES:
            r = st.get(name, {})
            rel = (r.get("requests_per_s") / base["requests_per_s"]
                   if r.get("requests_per_s") and base.get("requests_per_s") else None)
            lines.append("| %s | %s | %s | %s |" % (name, _fmt(r.get("requests_per_s"), 0), _fmt(rel, 2),
                                                   _fmt(r.get("cpu_us_per_request"))))
    if any("base" in res for res in results.values()):
        lines.append("")
        lines.append("| scenario | base req/s | balrs req/s | balrs/base | base/haproxy | balrs/haproxy |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, res in results.items():
            if "base" in res:
                r = res["ratios"]
                lines.append("| %s | %s | %s | %s | %s | %s |" % (
                    name, _fmt(res["base"].get("requests_per_s"), 0),
                    _fmt(res.get("balrs", {}).get("requests_per_s"), 0),
                    _fmt(r.get("balrs/base"), 2), _fmt(r.get("base/haproxy"), 2), _fmt(r.get("balrs/haproxy"), 2)))
    al = results.get("alog")
    if al:
        lines.append("")
        lines.append("| small, keep-alive | balrs req/s | with the json access log req/s | with / without | CPU us/req "
                     "without / with |")
        lines.append("|---|---:|---:|---:|---:|")
        lines.append("| balrs | %s | %s | %s | %s / %s |" % (
            _fmt(al.get("balrs", {}).get("requests_per_s"), 0), _fmt(al.get("log", {}).get("requests_per_s"), 0),
            _fmt(al["ratios"].get("log/balrs"), 3), _fmt(al.get("balrs", {}).get("cpu_us_per_request")),
            _fmt(al.get("log", {}).get("cpu_us_per_request"))))
    w = results.get("workers")
    if w:
        lines.append("")
        lines.append("| workers (small, keep-alive, unpinned) | workers = 1 req/s | workers = 2 req/s | 2 vs 1 |")
        lines.append("|---|---:|---:|---:|")
        lines.append("| balrs | %s | %s | %s |" % (_fmt(w.get("w1", {}).get("requests_per_s"), 0),
                                                 _fmt(w.get("w2", {}).get("requests_per_s"), 0),
                                                 _fmt(w["ratios"].get("w2/w1"), 2)))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="wrk load test: one backend directly vs balrs vs HAProxy")
    ap.add_argument("--duration", type=int, default=10, help="seconds measured per scenario and target (default 10)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up seconds before each measurement (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 s per scenario and target")
    ap.add_argument("--only", default=",".join(DEFAULT_SCENARIOS),
                    help="comma-separated scenarios among %s (default: %s)"
                    % (", ".join(SCENARIOS), ",".join(DEFAULT_SCENARIOS)))
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--backend", choices=["auto", "nginx", "python"], default="auto",
                    help="backend servers: nginx, or bench/pybackend.py (auto: nginx when installed)")
    ap.add_argument("--routes", type=int, default=0,
                    help="give balrs N [route] sections; requests match the last (see bench/callgrind.py)")
    ap.add_argument("--baseline", default="",
                    help="also measure the balrs of this other checkout (target 'base', without --routes: it may "
                         "predate them), in the same run")
    ap.add_argument("--json", default=os.path.join(RESULTS_DIR, "last.json"), help="where to write the JSON results")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        ap.error("unknown scenario(s) %s; choose among %s" % (", ".join(unknown), ", ".join(SCENARIOS)))
    if args.duration < 1 or args.warmup < 1:
        ap.error("--duration and --warmup must be at least 1 second")

    if not shutil.which("wrk"):
        print("bench/load.py: wrk is not installed, so there is nothing to measure with; %s" % INSTALL_HINT)
        return 0

    # SIGTERM (and SIGHUP) unwind like Ctrl-C so every child is killed in the finally below.
    def _terminate(signum, _frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    bench = Bench(args)
    started = time.monotonic()
    print("balrs load benchmark: %d s per target (+%d s warm-up), %d connections, backends: %s; %s"
          % (args.duration, args.warmup, args.connections, bench.backend_kind, bench.pin_note), flush=True)
    code = 0
    try:
        results = bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception as exc:  # report, but still clean up and keep the logs
        print("\nbench/load.py failed: %s" % exc, file=sys.stderr)
        for log in sorted(os.listdir(bench.tmp)):
            if log.endswith(".log"):
                with open(os.path.join(bench.tmp, log), errors="replace") as f:
                    tail = f.read().splitlines()[-10:]
                if tail:
                    print("--- tail of %s ---\n%s" % (log, "\n".join(tail)), file=sys.stderr)
        return 1
    finally:
        bench.procs.stop_all()
        _save_logs(bench)
        shutil.rmtree(bench.tmp, ignore_errors=True)

    elapsed = time.monotonic() - started
    table = print_table(results, bench.has_haproxy)
    print()
    print(table)
    print()
    problems = []
    for name, res in results.items():
        for target in TARGETS + WORKER_TARGETS + STRATEGIES + ["log"]:
            r = res.get(target)
            if r is None:
                continue
            e = _errors(r)
            if e:
                problems.append("%s/%s: %s" % (name, target, e))
            if target not in ("direct", "haproxy") and r.get("log_problems"):
                problems.append("%s/balrs log: %d warning/error line(s), e.g. %s"
                                % (name, len(r["log_problems"]), r["log_problems"][0]))
            if target != "direct" and target != "haproxy" and r.get("exit_code") not in (0, None):
                problems.append("%s/balrs exited %s after SIGTERM" % (name, r["exit_code"]))
    print("other load = CPU used on the machine by processes not of this benchmark during each measurement "
          "(direct / balrs / haproxy), in %% of one CPU out of %d; high values mean a noisy run."
          % (os.cpu_count() or 1))
    steal = max((r.get("steal_percent") or 0.0) for res in results.values() for t, r in res.items() if t in TARGETS)
    if steal >= 5:
        print("note: hypervisor steal time reached %.0f%% of a CPU during a measurement" % steal)
    for n in bench.notes:
        print("note: " + n)
    if problems:
        code = 0  # a measurement with errors is still a measurement; they are listed, not hidden
        print("problems:")
        for p in problems:
            print("  - " + p)
        print("(balrs logs of this run: %s)" % os.path.join(RESULTS_DIR, "balrs-last.log"))
    else:
        print("no wrk errors, no non-2xx responses, no balrs warnings")
    print("total %.0f s; JSON in %s" % (elapsed, os.path.relpath(args.json)))

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    doc = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                 "wrk": tool_version(["wrk", "--version"]),
                 "haproxy": tool_version(["haproxy", "-v"]) if bench.has_haproxy else None,
                 "nginx": tool_version(["nginx", "-v"]) if bench.backend_kind == "nginx" else None},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections,
                     "wrk_threads": 1, "backends": bench.backend_kind, "pinning": bench.pin_note},
        "notes": bench.notes,
        "problems": problems,
        "scenarios": {name: dict(res, description=SCENARIOS[name][2]) for name, res in results.items()},
        "table_markdown": table,
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    return code


def _save_logs(bench: Bench) -> None:
    if not bench.balrs_logs:
        return
    try:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, "balrs-last.log"), "w") as f:
            f.write("\n".join(bench.balrs_logs))
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
