#!/usr/bin/env python3
"""tally's benchmarks: measure, keep the measurements as JSON, render BENCHMARKS.md from them.

    scripts/bench.sh [SECTION…]            # the driver: tools, release builds, then `run`
    python3 scripts/bench.py run [SECTION…]     # measure; BENCH_DIR/results/SECTION.json
    python3 scripts/bench.py render [SECTION…]  # BENCHMARKS.md from the saved JSON alone
    python3 scripts/bench.py list               # the sections, one a line

Sections (`run` with none runs DEFAULT; `scale` only when named):

    ingest     durable ingest vs redis-benchmark INCR and a bare axum handler
    queries    /v1/views and /v1/top vs a bare axum handler; ingest-to-visible latency
    batch      the batch layer (full and incremental) vs DuckDB on the same master files
    uniques    /v1/uniques over 30 days for a busy URL
    mixed      queries while ingesting 100 000 events/s, 1 M URLs, result caches off
    analytics  site, breakdown and Stats API queries on the mixed data, while ingesting
    scale      100 M events, 1 M URLs, a year: full and incremental runs, DuckDB, serving memory
    cluster    3 nodes on a private nats-server -js: ingest vs one node and raw JetStream publish,
               ingest-to-visible on another node, /v1/views on a node that did not ingest

Each section is two functions: `measure_<name>(lab)` returns a dict of what it measured (plain
JSON: numbers, the commands it ran, the status tally answered), and `render_<name>(result)`
turns that dict into the section's markdown. `run` writes the JSON before rendering, so a
section's text can be changed and re-rendered without measuring again.

In BENCHMARKS.md a section is everything from its `## ` heading to the next. A rendered section
replaces the one with the same heading; sections no run produced (hand-written ones) stay. A
rendered section ends with END_MARK; what follows that line in the old section — the hand-written
reading of earlier runs — is kept below the new numbers.

Knobs (environment): BENCH_DURATION (wrk seconds per run, default 10), BENCH_THREADS (wrk
threads, default 2), BENCH_DIR (scratch directory on the real disk, default target/bench),
BENCH_OUT (report, default BENCHMARKS.md), BENCH_REPLACE=1 (write this run's sections alone),
BENCH_PERF=1 (mixed: `perf record -g` of tally while it ingests, to BENCH_DIR/mixed/perf.data),
and per section: BENCH_QUERY_EVENTS/URLS, BENCH_BATCH_EVENTS/URLS/DAYS/REPS,
BENCH_UNIQUES_EVENTS, BENCH_MIXED_EVENTS/URLS/RATE, BENCH_SCALE_EVENTS/URLS/DAYS/FILES.
Environment variables reach tally, so TALLY_* overrides its config as usual.

Every process is private and started here through scripts/lib.sh (start_private_redis,
start_private_tally, start_listening: the same starters as run.sh and test.sh): redis-server on
a unix socket under BENCH_DIR (a TCP port only for redis-benchmark), `tally serve` on a fresh
data directory, the bare axum example. Never the machine's Redis on 6379.
"""

import datetime
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
DUCKDB_PYTHON = ROOT / "target" / "venv-bench" / "bin" / "python"
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
BENCH_DIR = Path(os.environ.get("BENCH_DIR", ROOT / "target" / "bench")).resolve()
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "BENCHMARKS.md")).resolve()
RESULTS = BENCH_DIR / "results"
END_MARK = "<!-- end of the generated numbers: hand-written notes below this line are kept by scripts/bench.py -->"


def env_int(name, default):
    return int(os.environ.get(name, default))


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A benchmark that cannot go on: a process that did not start, an ingest that failed."""


# ------------------------------------------------------------------------------------------------
# Machine facts
# ------------------------------------------------------------------------------------------------


def sh(cmd):
    """The stdout of a shell command, stripped; '' when it fails."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 else ""


def now_utc(fmt="%Y-%m-%dT%H:%MZ"):
    return datetime.datetime.now(datetime.timezone.utc).strftime(fmt)


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine():
    """Where and when a section ran: recorded with its numbers."""
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {
        "date": now_utc(),
        "commit": sh("git rev-parse --short HEAD") or "unknown",
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -n 1"),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / (1 << 20)),
        "load_before": loadavg(),
    }


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


class Service:
    """A process started by a scripts/lib.sh starter, which stays its parent (bash `wait`s)."""

    def __init__(self, shell, pid, url):
        self.shell, self.pid, self.url = shell, pid, url

    def stop(self):
        if self.shell.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.shell.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.shell.wait()

    def rss_kb(self):
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
        return int(m.group(1)) if m else 0


class Redis(Service):
    def __init__(self, shell, pid, sock, port):
        super().__init__(shell, pid, None)
        self.sock, self.port = sock, port
        self.url = f"unix://{sock}"

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-s", str(self.sock), *args], capture_output=True,
                              text=True).stdout

    def used_memory(self):
        return int(re.search(r"^used_memory:(\d+)", self.cli("info", "memory"), re.M).group(1))


class Nats:
    """A private nats-server (started by Lab.nats)."""

    def __init__(self, proc, url):
        self.proc, self.url, self.pid = proc, url, proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Lab:
    """The scratch directory of a section and every process it started (stopped at the end)."""

    def __init__(self, name):
        self.dir = BENCH_DIR / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.services = []

    def _start(self, script, *args):
        """Runs `script` in bash with scripts/lib.sh sourced and `args` as $1…; the script starts
        one process and prints 'PID [URL]'; bash then waits for it, so it stays a child."""
        shell = subprocess.Popen(
            ["bash", "-c", f'. "{ROOT}/scripts/lib.sh" && {script} && wait', "bench", *args],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        words = shell.stdout.readline().split()
        if not words:
            shell.wait()
            raise BenchError(f"could not start: {script} {' '.join(args)}")
        return shell, int(words[0]), (words[1] if len(words) > 1 else None)

    def redis(self, tcp=False):
        """A private redis-server on DIR/redis/redis.sock (TCP on a free port when asked)."""
        for attempt in range(3):
            rdir = self.dir / "redis"
            subprocess.run(["rm", "-rf", str(rdir)], check=True)
            port = free_port() if tcp else 0
            opts = ["--save", "", "--appendonly", "no"]
            if tcp:
                opts += ["--port", str(port), "--bind", "127.0.0.1"]
            try:
                shell, pid, _ = self._start(
                    'start_private_redis "$@" >&2 && echo "$REDIS_PID"', str(rdir), *opts)
            except BenchError:
                log(f"redis-server did not start (attempt {attempt + 1}); see {rdir}/redis.log")
                continue
            r = Redis(shell, pid, rdir / "redis.sock", port)
            self.services.append(r)
            return r
        raise BenchError("could not start a private redis-server")

    def tally(self, name, redis, **env):
        """`tally serve` (release) on DIR/NAME/data, with TALLY_* overrides `env`."""
        tdir = self.dir / name
        assigns = [f"{k}={v}" for k, v in env.items()]
        shell, pid, url = self._start(
            'start_private_tally "$@" >&2 && echo "$TALLY_PID $TALLY_URL"',
            name, str(tdir), redis.url, *assigns)
        s = Service(shell, pid, url)
        self.services.append(s)
        return s

    def bare_axum(self):
        """The bare axum handler (tests/examples/bare_axum.rs): the reference for HTTP."""
        shell, pid, url = self._start(
            'start_listening "$@" >&2 && echo "$LISTEN_PID $LISTEN_URL"',
            "bare_axum", str(self.dir), str(RELEASE / "examples" / "bare_axum"))
        s = Service(shell, pid, url)
        self.services.append(s)
        return s

    def nats(self):
        """A private `nats-server -js` on a free loopback port, its store under DIR/nats."""
        ndir = self.dir / "nats"
        subprocess.run(["rm", "-rf", str(ndir)], check=True)
        ndir.mkdir(parents=True)
        port = free_port()
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        logf = open(ndir / "nats.log", "w")
        proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                                 str(ndir / "store")], stdout=logf, stderr=logf)
        n = Nats(proc, f"nats://127.0.0.1:{port}")
        self.services.append(n)
        wait_until("nats-server to be ready",
                   lambda: "Server is ready" in (ndir / "nats.log").read_text(), seconds=30)
        return n

    def stop(self, service):
        service.stop()
        if service in self.services:
            self.services.remove(service)

    def close(self):
        for s in reversed(self.services):
            s.stop()
        self.services = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd, out_path, time_path=None):
    """Runs cmd (a list), its stdout to out_path and stderr; with time_path under
    `/usr/bin/time -v` (peak RSS) whose report goes there. Returns the stdout lines as JSON
    objects (lines that are not JSON are skipped)."""
    log(" ".join(shlex.quote(str(c)) for c in cmd))
    if time_path:
        cmd = ["/usr/bin/time", "-v", "-o", str(time_path), *cmd]
    with open(out_path, "w") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True)
        for line in p.stdout:
            out.write(line)
            sys.stderr.write(line)
        if p.wait() != 0:
            raise BenchError(f"{cmd[0]} failed ({p.returncode}); output in {out_path}")
    return read_json_lines(out_path)


def read_json_lines(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def peak_rss_kb(time_path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(time_path).read_text())
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------------
# HTTP to tally
# ------------------------------------------------------------------------------------------------


class Client:
    """A keep-alive HTTP client for one base URL."""

    def __init__(self, base):
        u = urllib.parse.urlparse(base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)

    def request(self, method, path, body=None, ctype="application/json"):
        headers = {"Content-Type": ctype} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def json(self, method, path, body=None):
        status, data = self.request(method, path, body)
        if status >= 300:
            raise BenchError(f"{method} {path}: {status} {data[:200]!r}")
        return json.loads(data)


def status_of(url):
    try:
        return Client(url).json("GET", "/v1/admin/status")
    except (OSError, BenchError, ValueError):
        return {}


def batch_run(url):
    return Client(url).json("POST", "/v1/admin/batch?wait=true")


def wait_until(what, check, seconds=600, every=0.1, required=True):
    """Polls `check` until it holds; after `seconds` fails (or, not `required`, says so)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    if required:
        raise BenchError(f"gave up after {seconds} s waiting for {what}")
    log(f"WARNING: {what}: not after {seconds} s; going on")


def wait_caught_up(url):
    """Until every acknowledged event is visible to queries."""
    def caught_up():
        s = status_of(url)
        return s.get("acked_seq") is not None and s.get("acked_seq") == s.get("speed_applied_seq")
    wait_until("the speed layer to catch up", caught_up)


def load_events(url, phase, total, nurls):
    """Posts the queries/uniques load: PHASE "batch" is the first 90 % of `total` events, "speed"
    the other 10 %; URLs https://q<i % 50>.bench/page/<i> for i < nurls, ts over 30 days."""
    c = Client(url)
    n = total * 9 // 10 if phase == "batch" else total - total * 9 // 10
    rng = random.Random(1 if phase == "batch" else 2)
    now = int(time.time() * 1000)
    sent = 0
    while sent < n:
        k = min(10000, n - sent)
        lines = []
        for _ in range(k):
            i = rng.randrange(nurls)
            lines.append('{"url":"https://q%d.bench/page/%d","ts":%d,"visitor":"v%d"}'
                         % (i % 50, i, now - rng.randrange(30 * 86400000), rng.randrange(100000)))
        status, body = c.request("POST", "/v1/events", "\n".join(lines) + "\n",
                                 "application/x-ndjson")
        if status != 202:
            raise BenchError(f"ingest failed: {status} {body[:200]!r}")
        sent += k
    return sent


def visible_latency(url, n, query_url=None):
    """POSTs one event on a new URL and polls /v1/views (on `query_url`, another node, when
    given) until it counts, n times: ms p50/p99/max."""
    post, get = Client(url), Client(query_url or url)
    tag = int(time.time())
    lat = []
    for k in range(n):
        u = f"https://latency.bench/{tag}/{k}"
        q = "/v1/views?url=" + urllib.parse.quote(u, safe="")
        t0 = time.perf_counter()
        status, _ = post.request("POST", "/v1/events", json.dumps({"url": u}))
        if status != 202:
            raise BenchError(f"POST /v1/events: {status}")
        while True:
            status, body = get.request("GET", q)
            if status == 200 and json.loads(body).get("views") == 1:
                break
            if time.perf_counter() - t0 > 10:
                raise BenchError(f"event not visible after 10 s: {body[:200]!r}")
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    pick = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": lat[-1], "samples": n}


def one_line(answer, width):
    return json.dumps(answer, separators=(",", ":"))[:width] + "…"


# ------------------------------------------------------------------------------------------------
# wrk
# ------------------------------------------------------------------------------------------------


def latency_ms(text):
    """A wrk latency ("812.00us", "3.21ms", "1.02s", "1.50m") in ms."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if not m:
        return None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(lab, name, conns, script, url):
    """wrk for DURATION s at `conns` connections with the Lua `script` (a path); returns the
    command as run (script by its file name), requests/s, p50/p99 as wrk prints them, non-2xx."""
    threads = min(THREADS, conns)
    args = [f"-t{threads}", f"-c{conns}", f"-d{DURATION}s", "--latency"]
    cmd = f"wrk {' '.join(args)} -s {Path(script).name} {url}"
    log(f"{name}: {cmd}")
    out = subprocess.run(["wrk", *args, "-s", str(script), url], capture_output=True, text=True,
                         check=True).stdout
    (lab.dir / f"{name}.wrk").write_text(out)
    sys.stderr.write(out)
    rps = float(re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    bad = int(m.group(1)) if m else 0
    if bad:
        log(f"WARNING: {name}: {bad} responses were not 2xx")
    return {"cmd": cmd, "rps": rps, "p50": p50, "p99": p99, "p50_ms": latency_ms(p50),
            "p99_ms": latency_ms(p99), "non2xx": bad}


def lua(lab, name, text):
    path = lab.dir / name
    path.write_text(text)
    return path


def bare_events_lua(lab):
    """The load of the bare axum handler that query rates are compared with: one small POST."""
    return lua(lab, "bare.lua", 'request = function() return wrk.format("POST", "/v1/events", '
               '{["Content-Type"] = "application/json"}, \'{"url":"https://q1.bench/page/1"}\') end\n')


def ingest_lua(events):
    """POSTs /v1/events with `events` events per request (NDJSON when > 1, else one JSON object),
    rotating over 64 prebuilt bodies over 1000 URLs."""
    return f"""local events_per_request = {events}
local bodies = {{}}
local nbodies = 64
math.randomseed(42)
for b = 1, nbodies do
  local lines = {{}}
  for i = 1, events_per_request do
    lines[i] = string.format(
      '{{"url":"https://bench.example/page/%d","visitor":"v%d","id":"b%d-%d"}}',
      math.random(1, 1000), math.random(1, 100000), b, i)
  end
  if events_per_request == 1 then
    bodies[b] = lines[1]
  else
    bodies[b] = table.concat(lines, "\\n") .. "\\n"
  end
end
local ctype = events_per_request == 1 and "application/json" or "application/x-ndjson"
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/events", {{["Content-Type"] = ctype}}, bodies[(n % nbodies) + 1])
end
"""


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"


# ------------------------------------------------------------------------------------------------
# Section: ingest
# ------------------------------------------------------------------------------------------------


def measure_ingest(lab):
    redis = lab.redis(tcp=True)
    batch_lua = lua(lab, "batch1000.lua", ingest_lua(1000))
    single_lua = lua(lab, "single.lua", ingest_lua(1))
    # redis-benchmark first, on a quiet machine like the others.
    redis_cmd = f"redis-benchmark -p {redis.port} -t incr -P 100 -n 2000000 -q"
    log(redis_cmd)
    out = subprocess.run(shlex.split(redis_cmd), capture_output=True, text=True,
                         check=True).stdout.replace("\r", "\n")
    (lab.dir / "redis.out").write_text(out)
    redis_ops = float(re.findall(r"^INCR: ([0-9.]+)", out, re.M)[-1])
    redis.cli("flushall")
    # tally: durable ingest (the configured durability mode, default fsync per group commit).
    subprocess.run(["rm", "-rf", str(lab.dir / "tally")], check=True)
    tally = lab.tally("tally", redis)
    batch = wrk(lab, "tally-batch1000", 8, batch_lua, tally.url)
    single = wrk(lab, "tally-single", 64, single_lua, tally.url)
    status = status_of(tally.url)
    lab.stop(tally)
    bare = lab.bare_axum()
    bare_single = wrk(lab, "bare-single", 64, single_lua, bare.url)
    return {"redis_cmd": redis_cmd, "redis_ops": redis_ops, "batch": batch, "single": single,
            "bare": bare_single, "status": status}


def render_ingest(r):
    b, s, bare = r["batch"], r["single"], r["bare"]
    batch_eps = b["rps"] * 1000
    return f"""## Ingest: durable events/s vs Redis INCR and a bare axum handler

One run of `scripts/bench.sh ingest` ({r['machine']['date']}, commit {r['machine']['commit']}): wrk {r['duration']} s per line, {r['threads']} wrk threads on the
same machine as the server (the load generator shares the cores). tally runs in release with
`config/default.toml` on a fresh data directory on the local disk, so every `202` waited for
the WAL fsync (group commit); its speed layer writes to a private redis-server over a unix socket.

| what | command | requests/s | events/s | p50 | p99 | non-2xx |
|---|---|---:|---:|---:|---:|---:|
| tally, NDJSON bodies of 1000 events, 8 connections | `{b['cmd']}` | {b['rps']:.2f} | {batch_eps:.0f} | {b['p50']} | {b['p99']} | {b['non2xx']} |
| tally, one event per request, 64 connections | `{s['cmd']}` | {s['rps']:.2f} | {s['rps']:.0f} | {s['p50']} | {s['p99']} | {s['non2xx']} |
| bare axum handler (`tests/examples/bare_axum.rs`), same load | `{bare['cmd']}` | {bare['rps']:.2f} | – | {bare['p50']} | {bare['p99']} | – |
| redis-server INCR, pipelined by 100 | `{r['redis_cmd']}` | {r['redis_ops']:.2f} ops/s | – | – | – | – |

| ratio | value | goal |
|---|---:|---|
| tally batched events/s ÷ Redis INCR ops/s | {ratio(batch_eps, r['redis_ops'])} | ≥ 0.5 (moonshot 1.0) |
| tally single-event requests/s ÷ bare axum requests/s | {ratio(s['rps'], bare['rps'])} | ≥ 0.5 |

tally status after the run: `{json.dumps(r['status'], separators=(',', ':'))}`
"""


# ------------------------------------------------------------------------------------------------
# Section: queries. 1M events over 10 000 URLs (ts spread over 30 days): 90 % ingested, a batch
# run, then 10 % (so queries merge the batch view and the speed layer); wrk on /v1/views (random
# URL) and /v1/top?limit=10 beside the bare handler; then ingest-to-visible latency.
# ------------------------------------------------------------------------------------------------


def measure_queries(lab):
    events = env_int("BENCH_QUERY_EVENTS", 1_000_000)
    urls = env_int("BENCH_QUERY_URLS", 10_000)
    redis = lab.redis()
    subprocess.run(["rm", "-rf", str(lab.dir / "tally")], check=True)
    tally = lab.tally("tally", redis)
    log(f"loading 90% of {events} events over {urls} URLs, a batch run, then 10%")
    t0 = time.monotonic()
    load_events(tally.url, "batch", events, urls)
    t1 = time.monotonic()
    run = batch_run(tally.url)
    t2 = time.monotonic()
    load_events(tally.url, "speed", events, urls)
    wait_caught_up(tally.url)
    views_lua = lua(lab, "views.lua", f"""math.randomseed(7)
request = function()
  local i = math.random(0, {urls} - 1)
  return wrk.format("GET", string.format("/v1/views?url=https%%3A%%2F%%2Fq%d.bench%%2Fpage%%2F%d", i % 50, i))
end
""")
    top_lua = lua(lab, "top.lua",
                  'request = function() return wrk.format("GET", "/v1/top?limit=10") end\n')
    bare_lua = bare_events_lua(lab)
    views = wrk(lab, "tally-views", 32, views_lua, tally.url)
    top = wrk(lab, "tally-top", 32, top_lua, tally.url)
    log("ingest-to-visible latency")
    visible = visible_latency(tally.url, 500)
    sample = Client(tally.url).json("GET", "/v1/views?url=https%3A%2F%2Fq1.bench%2Fpage%2F1")
    status = status_of(tally.url)
    lab.stop(tally)
    bare = lab.bare_axum()
    bare_r = wrk(lab, "bare-queries", 32, bare_lua, bare.url)
    return {"events": events, "urls": urls, "load_s": t1 - t0, "run_s": t2 - t1, "run": run,
            "views": views, "top": top, "bare": bare_r, "visible_ms": visible, "sample": sample,
            "status": status}


def render_queries(r):
    v, t, bare, vis = r["views"], r["top"], r["bare"], r["visible_ms"]
    return f"""## Queries: /v1/views and /v1/top vs a bare axum handler; ingest-to-visible latency

One run of `scripts/bench.sh queries` ({r['machine']['date']}, commit {r['machine']['commit']}): {r['events']} events over {r['urls']} URLs (ts spread over 30 days),
90% ingested ({r['load_s']:.1f} s) then a batch run ({r['run_s']:.1f} s: `{one_line(r['run'], 160)}`),
then 10% left in the speed layer, so every query merges the batch view with the speed layer.
wrk {r['duration']} s per line, {r['threads']} wrk threads, 32 connections, on the same machine as the server.
The bare axum handler (`tests/examples/bare_axum.rs`) only has POST routes, so its baseline is a
POST of one small body answered `202` without any work.

| what | command | requests/s | p50 | p99 | non-2xx |
|---|---|---:|---:|---:|---:|
| `GET /v1/views?url=<random of {r['urls']}>` | `{v['cmd']}` | {v['rps']:.2f} | {v['p50']} | {v['p99']} | {v['non2xx']} |
| `GET /v1/top?limit=10` | `{t['cmd']}` | {t['rps']:.2f} | {t['p50']} | {t['p99']} | {t['non2xx']} |
| bare axum handler | `{bare['cmd']}` | {bare['rps']:.2f} | {bare['p50']} | {bare['p99']} | – |

| measure | value | goal |
|---|---:|---|
| views requests/s ÷ bare axum requests/s | {ratio(v['rps'], bare['rps'])} | ≥ 0.5 |
| views p99 at 32 connections | {v['p99']} | ≤ 2 ms |
| top (limit 10) p99 at 32 connections | {t['p99']} | ≤ 5 ms |
| ingest-to-visible p50 / p99 / max (500 events, POST then poll views, python keep-alive client) | {vis['p50']:.2f}ms / {vis['p99']:.2f}ms / {vis['max']:.2f}ms | p99 ≤ 10 ms |

A sample answer: `{json.dumps(r['sample'], separators=(',', ':'))}`

tally status after the run: `{json.dumps(r['status'], separators=(',', ':'))}`
"""


# ------------------------------------------------------------------------------------------------
# Section: batch. A master dataset generated by the tally-batch `batch_bench` example; on those
# files tally's kernel (best of REPS computes plus the write of the view) and DuckDB (the same
# outputs: per (url, 15-minute cell) counts, with sketches also approx_count_distinct per (url,
# day); best of REPS); then incremental runs on the same events in 100 files.
# ------------------------------------------------------------------------------------------------

BATCH_BENCH = RELEASE / "examples" / "batch_bench"
BATCH_BENCH_CMD = "cargo run --release -p tally-batch --example batch_bench --"

DUCKDB_SCRIPT = r'''
import json, os, sys, time
import duckdb
master, out, cutoff, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.makedirs(out, exist_ok=True)
files = os.path.join(master, "*.parquet")
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET TimeZone='UTC'")
src = f"read_parquet('{files}')"
hours = (f"SELECT url, epoch_ms(ts) // 900000 AS cell, count(*)::UBIGINT AS views FROM {src} "
         f"WHERE seq <= {cutoff} GROUP BY ALL ORDER BY url, cell")
days = (f"SELECT url, epoch_ms(ts) // 86400000 AS day, approx_count_distinct(visitor) AS uniques "
        f"FROM {src} WHERE seq <= {cutoff} GROUP BY ALL ORDER BY url, day")
def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
def copy(query, path):
    con.execute(f"COPY ({query}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    fsync(path)
for mode in ("counts", "counts+sketches"):
    for rep in range(reps):
        # End to end, as one would run it: read + decode + aggregate + sort + write, per output.
        t = time.perf_counter()
        copy(hours, os.path.join(out, "counts.parquet"))
        if mode != "counts":
            copy(days, os.path.join(out, "uniques.parquet"))
        total_ms = (time.perf_counter() - t) * 1000
        # The same split into stages: aggregate (incl. read + decode) into memory, then write.
        t = time.perf_counter()
        con.execute(f"CREATE OR REPLACE TEMP TABLE h AS {hours}")
        if mode != "counts":
            con.execute(f"CREATE OR REPLACE TEMP TABLE d AS {days}")
        agg_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        copy("SELECT * FROM h", os.path.join(out, "counts2.parquet"))
        if mode != "counts":
            copy("SELECT * FROM d", os.path.join(out, "uniques2.parquet"))
        write_ms = (time.perf_counter() - t) * 1000
        cells, events = con.execute("SELECT count(*), sum(views) FROM h").fetchone()
        line = {"engine": "duckdb", "mode": mode, "rep": rep, "total_ms": round(total_ms, 1),
                "read_decode_aggregate_ms": round(agg_ms, 1), "write_ms": round(write_ms, 1),
                "cells": cells, "events": int(events)}
        if mode != "counts":
            line["day_cells"] = con.execute("SELECT count(*) FROM d").fetchone()[0]
        print(json.dumps(line), flush=True)
print(json.dumps({"engine": "duckdb", "version": duckdb.__version__}))
'''


def duckdb(lab, master, cutoff, reps, time_path=None):
    """DuckDB (target/venv-bench, installed by the driver) on the master files: JSON lines."""
    script = lab.dir / "duckdb_bench.py"
    script.write_text(DUCKDB_SCRIPT)
    return run_logged([DUCKDB_PYTHON, script, master, lab.dir / "duckdb-out", cutoff, reps],
                      lab.dir / "duckdb.json", time_path)


def batch_mode_summary(tally, duck, mode):
    """Best-of numbers of one mode ("counts" or "counts+sketches") of both engines."""
    t = [x for x in tally if x.get("stage") == "compute" and x.get("mode") == mode]
    d = [x for x in duck if x.get("mode") == mode]
    best = min(t, key=lambda x: x["compute_ms"])
    write = [x for x in t if "write_ms" in x][-1]
    dbest = min(d, key=lambda x: x["total_ms"])
    tally_total = best["compute_ms"] + write["write_ms"]
    return {
        "tally_total_ms": tally_total, "compute_ms": best["compute_ms"], "open_ms": best["open_ms"],
        "scan_ms": best["scan_ms"], "read_decode_cpu_ms": best["read_decode_cpu_ms"],
        "aggregate_cpu_ms": best["aggregate_cpu_ms"], "merge_ms": best["merge_ms"],
        "write_ms": write["write_ms"], "reps_ms": [x["compute_ms"] for x in t],
        "duckdb_total_ms": dbest["total_ms"],
        "duckdb_aggregate_ms": min(x["read_decode_aggregate_ms"] for x in d),
        "duckdb_write_ms": min(x["write_ms"] for x in d),
        "duckdb_reps_ms": [x["total_ms"] for x in d],
        "cells": best["cells"], "events": best["events"],
        "duckdb_cells": dbest["cells"], "duckdb_events": dbest["events"],
    }


def incremental_rows(rows):
    return [r for r in rows if r.get("stage") == "incremental"]


def measure_batch(lab):
    events = env_int("BENCH_BATCH_EVENTS", 5_000_000)
    urls = env_int("BENCH_BATCH_URLS", 100_000)
    days = env_int("BENCH_BATCH_DAYS", 90)
    reps = env_int("BENCH_BATCH_REPS", 3)
    d = lab.dir
    gen_args = ["--events", events, "--urls", urls, "--days", days]
    gen = run_logged([BATCH_BENCH, *gen_args, "--dir", d, "--generate-only"], d / "generate.json")
    tally = run_logged([BATCH_BENCH, "--dir", d, "--reps", reps], d / "tally.json")
    duck = duckdb(lab, d / "master", events, reps)
    idir = BENCH_DIR / "batch-incremental"
    idir.mkdir(parents=True, exist_ok=True)
    inc_args = [*gen_args, "--files", 100]
    inc = run_logged([BATCH_BENCH, *inc_args, "--dir", idir, "--incremental"],
                     idir / "incremental.json")
    fmt = lambda args: " ".join(str(a) for a in args)  # noqa: E731
    return {
        "events": events, "urls": urls, "days": days, "reps": reps,
        "generate_cmd": f"{BATCH_BENCH_CMD} {fmt(gen_args)} --dir DIR --generate-only",
        "tally_cmd": f"{BATCH_BENCH_CMD} --dir DIR --reps {reps}",
        "incremental_cmd": f"{BATCH_BENCH_CMD} {fmt(inc_args)} --dir DIR --incremental",
        "master_bytes": gen[-1].get("bytes") if gen else None,
        "duckdb_version": next((x["version"] for x in duck if "version" in x), "?"),
        "counts": batch_mode_summary(tally, duck, "counts"),
        "sketches": batch_mode_summary(tally, duck, "counts+sketches"),
        "incremental": incremental_rows(inc),
    }


def render_batch(r):
    c, s, m = r["counts"], r["sketches"], r["machine"]
    reps = lambda xs: "/".join(f"{x:.0f}" for x in xs)  # noqa: E731
    inc = "\n".join(
        "| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f MB | %.0f %% |" % (
            x["mode"], x["scan_all_ms"], x["first_cached_run_ms"], x["one_new_file_ms"],
            x["one_new_file_merge_ms"], x["nothing_new_ms"], x["partial_bytes"] / 1e6,
            100.0 * x["one_new_file_ms"] / x["scan_all_ms"]) for x in r["incremental"])
    return f"""## Batch layer vs DuckDB: full recompute on the same master files

One run of `scripts/bench.sh batch` ({m['date']}, {m['cpu']}, {m['cores']} cores,
commit {m['commit']}, load average before the section {m['load_before']}).
Master dataset: `{r['generate_cmd']}` — {r['events']} events, {r['urls']} URLs (Zipf 1.0 over 50 hosts), {r['days']} days,
5 Parquet files ({r['master_bytes']} bytes, url dictionary-encoded, zstd, sorted by (url, ts), 1M-row row groups).
Both engines read the same files in the same run, one after the other, and produce the same outputs:
per (url, 15-minute cell) view counts (`seq <= cutoff`), sorted by (url, cell), written as zstd Parquet and fsynced;
with sketches also per (url, day) unique visitors (tally: its HLL sketch per (url, day), precision 14;
DuckDB: `approx_count_distinct(visitor)`). tally: `{r['tally_cmd']}` (the kernel of `tally batch run`:
read + decode + aggregate on rayon, merge, then the view store write with manifest), best compute of {r['reps']}
plus the write. DuckDB {r['duckdb_version']} from pip in `target/venv-bench`, `SET threads=2`, one `COPY (SELECT … GROUP BY … ORDER BY …) TO … (FORMAT parquet, COMPRESSION zstd)`
per output, best of {r['reps']}. Per-stage times: tally's from the example's JSON (CPU ms summed over threads for
read+decode and aggregate, wall ms for the rest); DuckDB's split is aggregate-into-a-temp-table, then write.

| what | tally total ms | DuckDB total ms | DuckDB ÷ tally | goal |
|---|---:|---:|---:|---|
| per (url, 15-minute cell) counts | {c['tally_total_ms']:.0f} | {c['duckdb_total_ms']:.0f} | {ratio(c['duckdb_total_ms'], c['tally_total_ms'])}× | ≥ 2× |
| counts + uniques per (url, day) | {s['tally_total_ms']:.0f} | {s['duckdb_total_ms']:.0f} | {ratio(s['duckdb_total_ms'], s['tally_total_ms'])}× | ≥ 2× |

| stage (ms) | tally counts | tally counts + sketches |
|---|---:|---:|
| open files + metadata (wall) | {c['open_ms']:.0f} | {s['open_ms']:.0f} |
| scan: read + decode + aggregate (wall) | {c['scan_ms']:.0f} | {s['scan_ms']:.0f} |
| … read + decode (CPU, all threads) | {c['read_decode_cpu_ms']:.0f} | {s['read_decode_cpu_ms']:.0f} |
| … aggregate (CPU, all threads) | {c['aggregate_cpu_ms']:.0f} | {s['aggregate_cpu_ms']:.0f} |
| merge per-file results (wall) | {c['merge_ms']:.0f} | {s['merge_ms']:.0f} |
| compute total (wall; reps {reps(c['reps_ms'])} / {reps(s['reps_ms'])}) | {c['compute_ms']:.0f} | {s['compute_ms']:.0f} |
| write the view (wall) | {c['write_ms']:.0f} | {s['write_ms']:.0f} |

| stage (ms) | DuckDB counts | DuckDB counts + uniques |
|---|---:|---:|
| read + decode + aggregate + sort into a temp table | {c['duckdb_aggregate_ms']:.0f} | {s['duckdb_aggregate_ms']:.0f} |
| write Parquet (zstd) + fsync | {c['duckdb_write_ms']:.0f} | {s['duckdb_write_ms']:.0f} |
| end to end, `COPY (query) TO` (reps {reps(c['duckdb_reps_ms'])} / {reps(s['duckdb_reps_ms'])}) | {c['duckdb_total_ms']:.0f} | {s['duckdb_total_ms']:.0f} |

Same answer: tally {c['cells']} (url, cell) entries over {c['events']} events; DuckDB {c['duckdb_cells']} cells over {c['duckdb_events']} events.

### Incremental runs: cached partials per master file

`{r['incremental_cmd']}` — the same {r['events']} events in 100 master files (in time order, as the sealer writes
them: each holds about {r['days'] // 100 + 1} day of events over most of the URLs). Per pass of a run, with sketches: scanning every file
without a cache, the first cached run (which writes the partials), a run where one file of 100
(1 % of the events) is new, and a run where nothing is. Goal: a run with 1 % new
data ≤ 5 % of the full run.

| pass | scan every file ms | first cached run ms | one new file ms | … of which merge ms | nothing new ms | partials on disk | one new ÷ scan |
|---|---:|---:|---:|---:|---:|---:|---:|
{inc}
"""


# ------------------------------------------------------------------------------------------------
# Section: scale (only when named: ~15 min, ~10 GB). A 100 M-event master dataset generated
# straight into Parquet (kept under BENCH_DIR, out of git); per pass of a batch run a scan of every
# file, a first cached run, a run with one new file (1 %), one with nothing new; DuckDB on the
# same files; a whole view written and loaded in a fresh process (serving memory). Peak RSS of
# each process from /usr/bin/time -v.
# ------------------------------------------------------------------------------------------------


def measure_scale(lab):
    events = env_int("BENCH_SCALE_EVENTS", 100_000_000)
    urls = env_int("BENCH_SCALE_URLS", 1_000_000)
    days = env_int("BENCH_SCALE_DAYS", 365)
    files = env_int("BENCH_SCALE_FILES", 100)
    d = lab.dir
    args = ["--events", events, "--urls", urls, "--days", days, "--files", files, "--dir", d]
    gen = run_logged([BATCH_BENCH, *args, "--generate-only"], d / "generate.json",
                     d / "generate.time")
    inc = run_logged([BATCH_BENCH, *args, "--incremental"], d / "incremental.json",
                     d / "incremental.time")
    log("a whole view as the runner makes it, written, then loaded in a fresh process")
    serving = {x["stage"]: x for x in run_logged([BATCH_BENCH, *args, "--serving"],
                                                 d / "serving.json", d / "serving.time")}
    duck = duckdb(lab, d / "master", events, 1, d / "duckdb.time")
    return {
        "events": events, "urls": urls, "days": days, "files": files,
        "cmd": f"{BATCH_BENCH_CMD} --events {events} --urls {urls} --days {days} --files {files} --dir DIR",
        "master_bytes": gen[-1].get("bytes"), "generate_ms": gen[-1].get("ms"),
        "incremental": incremental_rows(inc),
        "serving_write": serving["serving-write"], "serving_load": serving["serving-load"],
        "serving_peak_rss_kb": peak_rss_kb(d / "serving.time"),
        "tally_peak_rss_kb": peak_rss_kb(d / "incremental.time"),
        "duckdb_peak_rss_kb": peak_rss_kb(d / "duckdb.time"),
        "duckdb_ms": {x["mode"]: x["total_ms"] for x in duck if "mode" in x},
    }


def render_scale(r):
    m, w, ld = r["machine"], r["serving_write"], r["serving_load"]
    inc = "\n".join(
        "| %s | %.1f | %.1f | %.1f | %.1f | %.0f MB | %.1f %% |" % (
            x["mode"], x["scan_all_ms"] / 1e3, x["first_cached_run_ms"] / 1e3,
            x["one_new_file_ms"] / 1e3, x["nothing_new_ms"] / 1e3, x["partial_bytes"] / 1e6,
            100.0 * x["one_new_file_ms"] / x["scan_all_ms"]) for x in r["incremental"])
    duck = " / ".join(f"{mode} {ms / 1e3:.1f} s" for mode, ms in r["duckdb_ms"].items())
    cells = w["url_cells"] + w["source_cells"]
    rss = ld["rss_after_load"] - ld["rss_before_load"]
    return f"""## Scale: 100 M events, full and incremental batch runs

One run of `scripts/bench.sh scale` ({m['date']}, {m['cpu']}, {m['cores']} cores,
{m['ram_gib']} GiB, commit {m['commit']}).
Master dataset: `{r['cmd']} --generate-only` — {r['events']} events, {r['urls']} URLs (Zipf 1.0 over 50 hosts), {r['days']} days,
{r['files']} time-ordered Parquet files, {r['master_bytes']} bytes, generated in {r['generate_ms']:.0f} ms. Per pass of a batch run, with
visitors: `{r['cmd']} --incremental` (times in seconds; every cached run's view asserted equal to the scan's).

| pass | scan every file s | first cached run s | one new file ({100 // r['files']} % of the events) s | nothing new s | partials on disk | one new ÷ scan |
|---|---:|---:|---:|---:|---:|---:|
{inc}

Peak RSS: tally's example (all of the above, one process) {r['tally_peak_rss_kb'] // 1024} MiB; DuckDB (`SET threads=2`, counts and counts + uniques, one rep each) {r['duckdb_peak_rss_kb'] // 1024} MiB.
DuckDB end to end: {duck} (per (url, 15-minute cell) counts; with `approx_count_distinct(visitor)` per (url, day)). tally's full scan of the per-URL pass is the comparable number.

Serving: `{r['cmd']} --serving` computes both passes and writes them as the runner does ({w['compute_ms'] / 1e3:.1f} s compute, {w['write_ms'] / 1e3:.1f} s write, {w['view_bytes'] / 1e9:.2f} GB on disk, peak RSS {r['serving_peak_rss_kb'] / 1e6 * 1.024:.1f} GB with both views alive); then loads them in a fresh process as `tally serve` does: {ld['load_ms'] / 1e3:.1f} s, RSS {rss / 1e9:.2f} GB for {cells} (key, 15-minute cell) entries ({w['url_cells']} per URL, {w['source_cells']} per source key) and {w['cell_visitor_hashes']} per-cell visitor hashes — {rss / max(cells, 1):.0f} bytes per (key, cell) all told. Of those, the counts take 20 bytes per entry (cell number 8, prefix sum 8, visitor-list offset 4) and the visitor hashes 4 bytes each; the rest is day and week sketches, site unions and the key indexes.
"""


# ------------------------------------------------------------------------------------------------
# Section: uniques. BENCH_UNIQUES_EVENTS (300 000) events on one URL, visitors drawn from
# 100 000, ts over 30 days: 90 %, a batch run, 10 %, so every answer merges the batch view's day
# sketches with the speed layer's visitor sets; wrk on /v1/uniques over 30 days.
# ------------------------------------------------------------------------------------------------


def measure_uniques(lab):
    events = env_int("BENCH_UNIQUES_EVENTS", 300_000)
    redis = lab.redis()
    subprocess.run(["rm", "-rf", str(lab.dir / "tally")], check=True)
    tally = lab.tally("tally", redis)
    log(f"loading {events} events on one URL (90%, batch run, 10%)")
    load_events(tally.url, "batch", events, 1)
    run = batch_run(tally.url)
    load_events(tally.url, "speed", events, 1)
    wait_caught_up(tally.url)
    now = datetime.datetime.now(datetime.timezone.utc)
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    q = (f"/v1/uniques?url=https%3A%2F%2Fq0.bench%2Fpage%2F0"
         f"&from={iso(now - datetime.timedelta(days=30))}&to={iso(now)}")
    script = lua(lab, "uniques.lua", f'request = function() return wrk.format("GET", "{q}") end\n')
    sample = Client(tally.url).json("GET", q)
    res = wrk(lab, "tally-uniques", 32, script, tally.url)
    return {"events": events, "run": run, "query": q, "uniques": res, "sample": sample,
            "status": status_of(tally.url)}


def render_uniques(r):
    u = r["uniques"]
    return f"""## Uniques: /v1/uniques over 30 days for a busy URL

One run of `scripts/bench.sh uniques` ({r['machine']['date']}, commit {r['machine']['commit']}),
{r['events']} events on one URL (visitors drawn from 100 000, ts over 30 days): 90% then a batch run
(`{one_line(r['run'], 100)}`), then 10% left in the speed layer, so each answer merges
31 batch day sketches with the speed layer's visitor sets. wrk {r['duration']} s, {r['threads']} threads, 32 connections,
on the same machine as the server; `{r['query']}`.

| what | command | requests/s | p50 | p99 | non-2xx | goal |
|---|---|---:|---:|---:|---:|---|
| `GET /v1/uniques`, 30 days, busy URL | `{u['cmd']}` | {u['rps']:.2f} | {u['p50']} | {u['p99']} | {u['non2xx']} | p99 ≤ 5 ms |

A sample answer: `{json.dumps(r['sample'], separators=(',', ':'))}`

tally status after the run: `{json.dumps(r['status'], separators=(',', ':'))}`
"""


# ------------------------------------------------------------------------------------------------
# Sections mixed and analytics: tally (release, result caches off) loaded by
# tests/examples/mixed.rs with BENCH_MIXED_EVENTS (10 M) events over BENCH_MIXED_URLS (1 M) URLs
# (Zipf popularity, Zipf over 1 000 hosts, 30 days), two batch runs, restarted on that data; then
# while `mixed ingest` sends BENCH_MIXED_RATE (100 000) events/s and measures ingest-to-visible
# latency, wrk (32 connections) on the bare handler and on the queries, random URLs and hosts.
# ------------------------------------------------------------------------------------------------

MIXED = RELEASE / "examples" / "mixed"
MIXED_ENV = {"TALLY_QUERY_RESULT_CACHE": "false", "TALLY_SPEED_GC_GRACE": "1s"}


def mixed_lua(lab, kind, from_hour):
    """A wrk script for one query kind with random URLs or hosts of the load."""
    by_host = kind in ("host", "site", "breakdown", "stats")
    items = lab.dir / ("hosts.txt" if by_host else "urls.txt")
    return lua(lab, f"{kind}.lua", f"""local kind = "{kind}"
local function enc(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
local items = {{}}
local by_host = {"true" if by_host else "false"}
for line in io.lines("{items}") do items[#items + 1] = by_host and line or enc(line) end
math.randomseed(os.time() + math.random(1, 1000))
request = function()
  local x = items[math.random(1, #items)]
  if kind == "site" then return wrk.format("GET", "/v1/site?host=" .. x .. "&from={from_hour}&granularity=day") end
  if kind == "breakdown" then return wrk.format("GET", "/v1/breakdown?host=" .. x .. "&by=source&limit=10&from={from_hour}") end
  if kind == "stats" then
    return wrk.format("POST", "/api/v2/query", {{ ["Content-Type"] = "application/json" }},
      '{{"site_id":"' .. x .. '","metrics":["pageviews","visitors"],"date_range":"30d","dimensions":["event:page"],"pagination":{{"limit":10}}}}')
  end
  if kind == "top" then return wrk.format("GET", "/v1/top?limit=10") end
  if kind == "host" then return wrk.format("GET", "/v1/top?limit=10&host=" .. x) end
  if kind == "uniques" then return wrk.format("GET", "/v1/uniques?url=" .. x .. "&from={from_hour}") end
  return wrk.format("GET", "/v1/views?url=" .. x)
end
""")


class MixedSetup:
    """The loaded tally of the mixed and analytics sections, restarted on its data and idle."""

    def __init__(self, lab):
        self.lab = lab
        self.events = env_int("BENCH_MIXED_EVENTS", 10_000_000)
        self.urls = env_int("BENCH_MIXED_URLS", 1_000_000)
        self.rate = env_int("BENCH_MIXED_RATE", 100_000)
        d = lab.dir
        subprocess.run(["rm", "-rf", str(d / "tally")], check=True)
        self.redis = lab.redis()
        tally = lab.tally("tally", self.redis, **MIXED_ENV)
        log(f"loading {self.events} events over {self.urls} URLs")
        self.load = run_logged([MIXED, "load", tally.url, d, "--events", self.events,
                                "--urls", self.urls], d / "load.json")
        wait_caught_up(tally.url)
        self.run1 = batch_run(tally.url)
        self.run2 = batch_run(tally.url)
        # The loaded epoch is collected a second after the second view serves.
        wait_until("the loaded epoch to be collected",
                   lambda: len(status_of(tally.url).get("speed_epochs", [None, None])) == 1, 30,
                   required=False)
        # Serving memory without what the load left in the allocator: restart, load the view and
        # the speed state from Redis, measure when ready.
        lab.stop(tally)
        self.tally = lab.tally("tally", self.redis, **MIXED_ENV)
        wait_until("readyz", lambda: self._ready(), 60)
        # UNLINK frees in the background: wait until Redis has freed the collected epoch.
        wait_until("Redis to free the collected epoch",
                   lambda: "lazyfree_pending_objects:0" in self.redis.cli("info", "memory"), 60,
                   required=False)
        self.idle_rss_kb = self.tally.rss_kb()
        self.redis_idle = self.redis.used_memory()
        (d / "redis-idle.txt").write_text(self.redis_keys())
        self.bare = lab.bare_axum()
        from_hour = (datetime.datetime.now(datetime.timezone.utc)
                     - datetime.timedelta(days=30)).strftime("%Y-%m-%dT%H:00:00Z")
        self.lua = {k: mixed_lua(lab, k, from_hour)
                    for k in ("views", "top", "host", "uniques", "site", "breakdown", "stats")}

    def _ready(self):
        try:
            return Client(self.tally.url).request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def redis_keys(self):
        """Which epochs Redis holds, and how many keys: for reading by hand."""
        return self.redis.cli("info", "keyspace") + self.redis.cli("smembers", "tally:epochs")

    def ingest(self, runs):
        """Starts the steady ingest for RUNS wrk runs (and some slack); returns the process."""
        seconds = DURATION * runs + 10
        log(f"ingesting {self.rate} events/s for {seconds} s while wrk runs")
        out = open(self.lab.dir / "ingest.json", "w")
        p = subprocess.Popen([str(MIXED), "ingest", self.tally.url, str(self.lab.dir),
                              "--rate", str(self.rate), "--seconds", str(seconds),
                              "--urls", str(self.urls)], stdout=out)
        out.close()
        time.sleep(3)  # let the ingest reach its rate before measuring
        return p

    def finish(self, ingest):
        ingest.wait()
        self.lab.close()
        return json.loads((self.lab.dir / "ingest.json").read_text())

    def common(self):
        return {"events": self.events, "urls": self.urls, "rate": self.rate,
                "run1": self.run1, "run2": self.run2}


def measure_mixed(lab):
    m = MixedSetup(lab)
    ingest = m.ingest(5)
    perf = None
    if os.environ.get("BENCH_PERF", "0") == "1":
        perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(m.tally.pid),
                                 "-o", str(lab.dir / "perf.data"), "--", "sleep",
                                 str(DURATION * 5)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    r = m.common()
    r["bare"] = wrk(lab, "mixed-bare", 32, m.lua["views"], m.bare.url)
    for kind in ("views", "top", "host", "uniques"):
        r[kind] = wrk(lab, f"mixed-{kind}", 32, m.lua[kind], m.tally.url)
    r["busy_rss_kb"] = m.tally.rss_kb()
    r["redis_busy"] = m.redis.used_memory()
    r["status"] = status_of(m.tally.url)
    # Kept for reading by hand (e.g. tally_speed_mirror_write_seconds: how long queries wait).
    try:
        (lab.dir / "metrics.txt").write_bytes(Client(m.tally.url).request("GET", "/metrics")[1])
    except OSError:
        pass
    (lab.dir / "redis-busy.txt").write_text(m.redis_keys())
    if perf:
        perf.wait()
    r["ingest"] = m.finish(ingest)
    manifest = json.loads((lab.dir / "tally" / "data" / "views" / "batch" / r["run2"]["version"]
                           / "manifest.json").read_text())
    r.update(idle_rss_kb=m.idle_rss_kb, redis_idle=m.redis_idle, view_cells=manifest["cells"],
             view_urls=manifest["urls"])
    return r


def p99x(bare, x):
    return ratio(x["p99_ms"], bare["p99_ms"])


def wrk_row(label, x, bare, goal):
    return (f"| {label} | {x['rps']:.2f} | {x['p50']} | {x['p99']} | {x['non2xx']} | "
            f"{p99x(bare, x)} | {goal} |")


def render_mixed(r):
    bare, ing = r["bare"], r["ingest"]
    vis, lag = ing.get("visible_ms") or {}, ing.get("lag_events") or {}
    live = sum(e.get("urls", 0) for e in r["status"].get("speed_epochs", []))
    cells = r["view_cells"]
    views_goal = f"≤ 2; requests/s ≥ 0.5× bare (here {ratio(r['views']['rps'], bare['rps'])}×)"
    return f"""## Mixed: queries while ingesting, a million URLs, caches off

One run of `scripts/bench.sh mixed` ({r['machine']['date']}, commit {r['machine']['commit']}).
tally (release, `TALLY_QUERY_RESULT_CACHE=false`: every answer computed) loaded by `tests/examples/mixed.rs load`
with {r['events']} events over {r['urls']} URLs (popularity Zipf 1.0, URLs spread over 1 000 hosts by Zipf, ts over 30 days),
then two batch runs (the view: {r['view_urls']} URLs, {cells} (url, 15-minute cell) entries; `{one_line(r['run1'], 120)}`).
Then `mixed ingest` sent NDJSON bodies of 1 000 events at a target of {r['rate']} events/s (achieved {ing['rate']:.0f}/s, {ing['failed_requests']} failed requests)
while wrk ({r['duration']} s, {r['threads']} threads, 32 connections, random URLs and hosts of the load) ran one line after the other,
first against the bare axum handler (`tests/examples/bare_axum.rs`, `GET /v1/views` answering a fixed body) under the same ingest.
Everything shares the machine's cores: wrk, the ingest generator, redis-server and tally.

| what (under {r['rate']} events/s of ingest) | requests/s | p50 | p99 | non-2xx | p99 ÷ bare p99 | goal |
|---|---:|---:|---:|---:|---:|---|
| bare axum handler, `{bare['cmd']}` | {bare['rps']:.2f} | {bare['p50']} | {bare['p99']} | – | 1 | – |
{wrk_row("`/v1/views?url=<random>`", r['views'], bare, views_goal)}
{wrk_row("`/v1/top?limit=10`", r['top'], bare, "≤ 3")}
{wrk_row("`/v1/top?limit=10&host=<random>`", r['host'], bare, "≤ 3")}
{wrk_row("`/v1/uniques?url=<random>&from=<30 days ago>`", r['uniques'], bare, "≤ 3")}

| measure | value | goal |
|---|---:|---|
| ingest-to-visible (POST one event on a new URL, poll /v1/views) p50 / p99 / max | {vis.get('p50', 0):.1f} / {vis.get('p99', 0):.1f} / {vis.get('max', 0):.1f} ms | p99 ≤ 100 ms |
| applier lag in events (sampled every 20 ms) p50 / p99 | {lag.get('p50', 0):.0f} / {lag.get('p99', 0):.0f} | – |
| tally RSS, restarted on the loaded data (view loaded, idle) / at the end of the mixed load | {r['idle_rss_kb'] // 1024} / {r['busy_rss_kb'] // 1024} MiB | – |
| serving memory per (url, 15-minute cell) entry of the batch view (restarted idle RSS ÷ cells; includes per-URL index, day sketches, the process) | {r['idle_rss_kb'] * 1024 / max(cells, 1):.0f} bytes | stated |
| Redis `used_memory` idle / under the mixed load | {r['redis_idle'] >> 20} / {r['redis_busy'] >> 20} MiB | – |
| Redis bytes per live URL (`used_memory` ÷ the {live} URLs of the live epochs) | {r['redis_busy'] / max(live, 1):.0f} | ≤ 800 (half of ~1 600) |

tally status at the end: `{json.dumps(r['status'], separators=(',', ':'))}`
"""


def measure_analytics(lab):
    m = MixedSetup(lab)
    ingest = m.ingest(4)
    r = m.common()
    r["bare"] = wrk(lab, "analytics-bare", 32, m.lua["views"], m.bare.url)
    for kind in ("site", "breakdown", "stats"):
        r[kind] = wrk(lab, f"analytics-{kind}", 32, m.lua[kind], m.tally.url)
    # The dashboard's first view of the busiest site (30 days) in Chromium while the ingest
    # finishes (node, chromium and dashboard/node_modules: the driver installs them).
    r["top_host"] = (lab.dir / "hosts.txt").read_text().split("\n", 1)[0]
    r["dashboard"] = None
    if Path("/usr/bin/chromium").exists() and (ROOT / "dashboard" / "node_modules").is_dir():
        p = subprocess.run(["node", "test/first_view.mjs"], cwd=ROOT / "dashboard", text=True,
                           capture_output=True,
                           env={**os.environ, "TALLY_URL": m.tally.url, "SITE": r["top_host"]})
        if p.returncode == 0:
            r["dashboard"] = json.loads(p.stdout)
        else:
            log(f"dashboard first view failed: {p.stderr[-2000:]}")
    r["status"] = status_of(m.tally.url)
    r["ingest"] = m.finish(ingest)
    return r


def render_analytics(r):
    bare, ing = r["bare"], r["ingest"]
    lag = (ing.get("lag_events") or {}).get("p99", 0)
    dash = r.get("dashboard")
    if dash:
        dashboard = (
            f"Dashboard, first view of the busiest site ({r['top_host']}, last 30 days) in headless Chromium with an empty cache, 5 runs\n"
            f"(`dashboard/test/first_view.mjs`): navigation start to the totals, chart and realtime on screen median {dash['interactive_ms_median']} ms, worst {dash['interactive_ms_max']} ms\n"
            f"(goal ≤ 1 000 ms); to the six breakdown panels filled too, median {dash['complete_ms_median']} ms; page transferred {dash['first_view_bytes']} bytes (goal ≤ 100 KB).")
    else:
        dashboard = ("Dashboard first view: skipped (needs /usr/bin/chromium and dashboard/node_modules; "
                     "`scripts/bench.sh analytics` installs them, or it failed: see the run's log).")
    return f"""## Analytics: site, breakdown and Stats API queries while ingesting

One run of `scripts/bench.sh analytics` ({r['machine']['date']}, commit {r['machine']['commit']}),
on the data of the mixed section ({r['events']} events, {r['urls']} URLs over 1 000 hosts, 30 days, two batch runs, tally restarted on it,
`TALLY_QUERY_RESULT_CACHE=false`), while `mixed ingest` sent {r['rate']} events/s (achieved {ing['rate']:.0f}/s; applier lag p99 {lag:.0f} events).
wrk: {r['duration']} s, {r['threads']} threads, 32 connections, a random host of the load per request; one run after the other.

| what (under ingest) | requests/s | p50 | p99 | non-2xx | p99 ÷ bare p99 | goal |
|---|---:|---:|---:|---:|---:|---|
| bare axum handler, `{bare['cmd']}` | {bare['rps']:.2f} | {bare['p50']} | {bare['p99']} | – | 1 | – |
{wrk_row("`/v1/site?host=<random>&from=<30 days ago>&granularity=day`", r['site'], bare, "p99 ≤ 10 ms")}
{wrk_row("`/v1/breakdown?host=<random>&by=source&limit=10&from=<30 days ago>`", r['breakdown'], bare, "p99 ≤ 10 ms")}
{wrk_row("`POST /api/v2/query` pageviews + visitors by `event:page`, `30d`, limit 10", r['stats'], bare, "p99 ≤ 10 ms")}

{dashboard}

tally status at the end: `{json.dumps(r['status'], separators=(',', ':'))}`
"""


# ------------------------------------------------------------------------------------------------
# Main: run sections, keep their JSON, render BENCHMARKS.md
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# Section: cluster. One tally alone, then three on a private nats-server -js (each follows the
# log into its own data_dir; one shared Redis): batched ingest through all three at once vs the
# single node and vs raw JetStream publishes of the same message size (tests/examples/
# nats_publish.rs); ingest-to-visible from one node to another; /v1/views on a node that took no
# ingest vs the bare axum handler.
# ------------------------------------------------------------------------------------------------


def cluster_caught_up(urls):
    def check():
        for u in urls:
            s = status_of(u)
            log_ = (s.get("cluster") or {}).get("log") or {}
            if log_.get("last_seq") is None or log_.get("followed_seq") != log_.get("last_seq"):
                return False
            if s.get("acked_seq") != s.get("speed_applied_seq"):
                return False
        return True
    wait_until("every node to follow the log and apply it", check)


def measure_cluster(lab):
    from concurrent.futures import ThreadPoolExecutor
    redis = lab.redis()
    batch_lua = lua(lab, "batch1000.lua", ingest_lua(1000))
    # One node alone, the same load as the ingest section's batched line.
    subprocess.run(["rm", "-rf", str(lab.dir / "single")], check=True)
    single = lab.tally("single", redis)
    one = wrk(lab, "single-batch1000", 8, batch_lua, single.url)
    lab.stop(single)
    redis.cli("flushall")

    nats = lab.nats()
    pub_cmd = [str(RELEASE / "examples" / "nats_publish"), "--url", nats.url, "--size", "85000",
               "--concurrency", "24", "--seconds", str(DURATION)]
    raw = run_logged(pub_cmd, lab.dir / "nats_publish.out")[-1]
    raw["cmd"] = "nats_publish --size 85000 --concurrency 24 --seconds " + str(DURATION)
    nodes = []
    for i in range(3):
        subprocess.run(["rm", "-rf", str(lab.dir / f"node{i + 1}")], check=True)
        nodes.append(lab.tally(f"node{i + 1}", redis, TALLY_QUEUE_URL=nats.url,
                               TALLY_CLUSTER_NODE_ID=f"node{i + 1}"))
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda ni: wrk(lab, f"cluster-batch1000-node{ni[0] + 1}", 8,
                                            batch_lua, ni[1].url), enumerate(nodes)))
    t0 = time.monotonic()
    cluster_caught_up([n.url for n in nodes])
    catch_up_s = time.monotonic() - t0
    log("ingest-to-visible, node1 -> node2")
    visible = visible_latency(nodes[0].url, 300, query_url=nodes[1].url)
    views_lua = lua(lab, "views.lua", """math.randomseed(7)
request = function()
  local i = math.random(1, 1000)
  return wrk.format("GET", string.format("/v1/views?url=https%%3A%%2F%%2Fbench.example%%2Fpage%%2F%d", i))
end
""")
    # node2 took no ingest from clients since the load; it answers from what it followed.
    views = wrk(lab, "cluster-views-node2", 32, views_lua, nodes[1].url)
    statuses = [status_of(n.url) for n in nodes]
    for n in nodes:
        lab.stop(n)
    bare = lab.bare_axum()
    bare_lua = bare_events_lua(lab)
    bare_r = wrk(lab, "bare-queries", 32, bare_lua, bare.url)
    return {"single": one, "raw": raw, "cluster": runs, "catch_up_s": catch_up_s,
            "visible_ms": visible, "views": views, "bare": bare_r,
            "cluster_status": [s.get("cluster") for s in statuses],
            "nats_version": sh("$(command -v nats-server || echo /usr/sbin/nats-server) --version")}


def render_cluster(r):
    one, raw, runs, vis, views, bare = (r["single"], r["raw"], r["cluster"], r["visible_ms"],
                                        r["views"], r["bare"])
    one_eps = one["rps"] * 1000
    cluster_eps = sum(x["rps"] for x in runs) * 1000
    raw_eps = raw["msgs_per_s"] * 1000
    rows = "\n".join(
        f"| tally node{i + 1}, NDJSON bodies of 1000 events, 8 connections (all three at once) | "
        f"`{x['cmd']}` | {x['rps']:.2f} | {x['rps'] * 1000:.0f} | {x['p50']} | {x['p99']} | {x['non2xx']} |"
        for i, x in enumerate(runs))
    return f"""## Cluster: three nodes on NATS JetStream vs one node and raw JetStream publishes

One run of `scripts/bench.sh cluster` ({r['machine']['date']}, commit {r['machine']['commit']}), everything on this one machine
({r['machine']['cores']} cores shared by the load generators, NATS, Redis and the nodes): a private `{r['nats_version']}` with
JetStream (file storage, one replica), three `tally serve` nodes with `queue.url` set, each
following the log into its own data directory, one shared private Redis. The single-node line is
the same tally with the local WAL, measured first in the same run. The raw line is
`tests/examples/nats_publish.rs`: 85 000-byte messages (one 1000-event request as the log
carries it), 24 publishers each waiting for its acknowledgement, to a fresh stream — JetStream
alone, with no HTTP, parsing or WAL.

| what | command | requests/s | events/s | p50 | p99 | non-2xx |
|---|---|---:|---:|---:|---:|---:|
| tally, one node, NDJSON bodies of 1000 events, 8 connections | `{one['cmd']}` | {one['rps']:.2f} | {one_eps:.0f} | {one['p50']} | {one['p99']} | {one['non2xx']} |
{rows}
| raw JetStream publish, 85 000-byte messages | `{raw['cmd']}` | {raw['msgs_per_s']:.1f} msgs/s | {raw_eps:.0f} | – | – | – |
| tally node2 `/v1/views` (random URL of the load), 32 connections | `{views['cmd']}` | {views['rps']:.2f} | – | {views['p50']} | {views['p99']} | {views['non2xx']} |
| bare axum handler, 32 connections | `{bare['cmd']}` | {bare['rps']:.2f} | – | {bare['p50']} | {bare['p99']} | – |

| ratio | value | goal |
|---|---:|---|
| cluster events/s (three nodes at once) ÷ one node's | {ratio(cluster_eps, one_eps)} | ≥ 0.5 |
| cluster events/s ÷ raw JetStream publish (events in the same message size) | {ratio(cluster_eps, raw_eps)} | – |
| `/v1/views` on a node that took no ingest ÷ bare axum | {ratio(views['rps'], bare['rps'])} | ≥ 0.3 |

Ingest-to-visible across nodes (POST one event to node1, poll `/v1/views` on node2 until it
counts, {vis['samples']} times, after the load): p50 {vis['p50']:.1f} ms, p99 {vis['p99']:.1f} ms, max {vis['max']:.1f} ms
(goal: p99 ≤ 50 ms). After the load the three nodes took {r['catch_up_s']:.1f} s to follow and apply
everything.

Each node's place in the log after the run: `{json.dumps([c and c.get('log') for c in r['cluster_status']], separators=(',', ':'))}`
"""


SECTIONS = ["ingest", "queries", "batch", "uniques", "mixed", "analytics", "scale", "cluster"]
DEFAULT = [s for s in SECTIONS if s not in ("scale", "cluster")]


def measure(name):
    lab = Lab(name)
    meta = machine()
    log(f"section {name}")
    try:
        result = globals()[f"measure_{name}"](lab)
    finally:
        lab.close()
    meta["load_after"] = loadavg()
    result.update(section=name, machine=meta, duration=DURATION, threads=THREADS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def render(result):
    return globals()[f"render_{result['section']}"](result).rstrip("\n") + "\n\n" + END_MARK + "\n\n"


def split_sections(text):
    """(the text before the first `## `, [each `## ` section with its heading line])."""
    head, blocks = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
        else:
            head.append(line)
    return "".join(head), ["".join(b) for b in blocks]


def merge_report(old, new_sections, header):
    """The report: `header`, then the old sections in their order with each one this run rendered
    replaced (keeping what followed END_MARK in the old one), then new ones appended."""
    fresh = {s.split("\n", 1)[0]: s for s in new_sections}
    out = []
    for block in split_sections(old)[1] if old else []:
        title = block.split("\n", 1)[0]
        if title in fresh:
            new = fresh.pop(title)
            if END_MARK in block:
                kept = block.split(END_MARK, 1)[1].strip("\n")
                if kept:
                    new = new + kept + "\n\n"
            block = new
        out.append(block)
    out.extend(s for s in new_sections if s.split("\n", 1)[0] in fresh)
    return header + "".join(out)


def header(names):
    m = machine()
    return f"""# Benchmarks

Written by `scripts/bench.sh {' '.join(names)}`; rerun it to refresh. Numbers from one run on one machine:
compare ratios measured in the same run, not absolute numbers across machines. Each generated
section's measurements are in `target/bench/results/<section>.json` (`python3 scripts/bench.py
render` renders them again); notes below a section's end mark are hand-written and kept.

- date: {now_utc("%Y-%m-%dT%H:%M:%SZ")}
- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM
- kernel: {sh("uname -sr")}; {sh("rustc --version")}; {sh("wrk -v 2>&1 | head -n 1 | cut -d' ' -f1,2")}; {sh("redis-server --version | cut -d' ' -f1-3")}
- commit: {m['commit']}

Sections this run did not produce are kept from earlier runs (see the run each names).

"""


def write_report(names, results):
    new_sections = [render(r) for r in results]
    old = OUT.read_text() if OUT.exists() and os.environ.get("BENCH_REPLACE", "0") != "1" else ""
    text = merge_report(old, new_sections, header(names))
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    log(f"wrote {OUT}")


def main(argv):
    cmd, names = (argv[0], argv[1:]) if argv else ("run", [])
    if cmd == "list":
        print("\n".join(SECTIONS))
        return 0
    if cmd not in ("run", "render"):
        print(__doc__, file=sys.stderr)
        return 2
    names = names or DEFAULT
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section {' '.join(unknown)} (have: {' '.join(SECTIONS)})", file=sys.stderr)
        return 2
    if cmd == "render":
        results = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    else:
        results = [measure(n) for n in names]
    write_report(names, results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
