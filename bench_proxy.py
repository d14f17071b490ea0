#!/usr/bin/env python3
"""bench_proxy.py: what proxy.py costs per token, measured against the direct path.

Run:  python3 bench_proxy.py                 (every scenario, both routes)
      python3 bench_proxy.py latency abort   (some of them)
      python3 bench_proxy.py --json          (for machines)

One asyncio loop plays the upstream (chat.completion.chunk events, HTTP/1.1
chunked, each chunk stamped with its send time) and every client. proxy.py
runs as a subprocess. Each scenario runs straight against the upstream and
then through the proxy, in the same run, so every figure is also a ratio to
the direct path. Where the machine allows, every thread of the proxy is
pinned to one CPU and this process to another. Streams start at random
points within one gap between chunks, as independent clients do. The
proxy's CPU time comes from its process_cpu_seconds_total metric. Standard
library only.

Under load: `overload` starts more streams than one process relays well,
with the proxy's own limits on and /healthz probed from a process of its
own; `keepalive` times requests sent back to back on kept-alive
connections; `flood` holds connections by slowloris, slow bodies and a
connection flood while a new client posts to /message, and counts the
answers it gets.

Far away: `rtt` puts an HTTPS upstream behind a relay that holds every byte
10 ms each way (and a new connection's first bytes a round trip more), and
times the first byte of requests sent one after another and in two waves,
counting the connections the upstream accepts.

Limits: `limits` times one client's requests through a proxy without
per-client limits, with them in the process, and with them in Redis
(Debian's redis-server, started here) on loopback and behind the relay.

Per request: `requests` sends 1,000 one-chunk streams one after another on
one kept-alive connection (the CPU a request costs, and what it adds to the
first byte); `burst` has 1,000 and then 500 clients start within a second,
each sending 3 streams of 50 chunks 100 ms apart one after another, a new
connection each (the tail they see, and the CPU per chunk). Both have
reference rows: Debian's nginx (one worker, proxy_buffering off, upstream
keepalive) on /v1, and with --with-limits this proxy.py with per-client
limits in the process. --baseline REV runs proxy.py as of an earlier commit
(a git worktree) in turn with this one, in every scenario of the run.

Realtime: `realtime` opens 200 WebSocket sessions at once, each sending
100 stamped audio-sized events each way 20 ms apart (as the Realtime API's
input_audio_buffer.append and response.output_audio.delta go): the delay
each way against the direct path, and the CPU per event; nginx (with the
README's Upgrade mapping) is the reference row.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import string
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

def openai_like_key(seed):
    """A key shaped like OpenAI's (sk-proj- and 156 characters), the same for the same seed: no text the bench
    sends or receives holds a piece of one (a key the traffic quotes costs the masking its slow path on every
    chunk), and the masking works on keys as long as real ones."""
    rng = random.Random(seed)
    return "sk-proj-" + "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(156))


BENCH_KEY = openai_like_key(0)  # the upstream key every proxy.py runs with

# The per-token scenarios measure the relay itself: no limit of the proxy's may refuse a stream.
UNLIMITED = ("--max-streams", "0")

# overload: more streams than one process can relay well, started within RAMP seconds, with
# /healthz probed every PROBE_EVERY seconds; the proxy runs with its default limits.
OVERLOAD = (1500, 60, 0.1, 0.0)  # streams, chunks, gap, think: 6 s streams at 10 chunks/s
RAMP = 1.0
PROBE_EVERY = 0.2
# keepalive: clients each sending requests back to back on one connection for KEEPALIVE_SECONDS.
KEEPALIVE = (8, 5, 0.0, 0.0)
KEEPALIVE_SECONDS = 10.0

# flood: attackers hold connections the cheap way for FLOOD_SECONDS each, more of them than the
# proxy's default MAX_CONNECTIONS (2048), while a new client posts to /message every PROBE_EVERY s.
FLOODS = ("slowloris", "slowbody", "connections")
FLOOD_ATTACKERS = 3000
FLOOD_SECONDS = 60.0

# siege: issue 32's outside run with the C tools (their own processes): SIEGE_SLOW slowloris connections
# (slowhttptest -H, SIEGE_SLOW_RATE new ones a second) and SIEGE_WRK kept-alive clients hammering /healthz (wrk),
# --flood-seconds long, while a new client posts to /message every PROBE_EVERY s; nginx beside it as the reference.
SIEGE_SLOW, SIEGE_SLOW_RATE, SIEGE_WRK = 10000, 2000, 4000

# rtt: an HTTPS upstream DELAY seconds away each way (a new connection's first bytes wait one round
# trip more, as TCP's handshake does), RTT_SEQUENTIAL requests one after another, then two waves of
# RTT_WAVE streams at once; short streams, for the time to the first byte is what a round trip costs.
RTT = (2, 5, 0.0, 0.0)
RTT_DELAY = 0.010
RTT_SEQUENTIAL = 20
RTT_WAVE = 50

# name: (streams, chunks per stream, gap between chunks in s, seconds before the first chunk)
# limits: one client sending requests back to back (so that no request waits for another's CPU), through
# a proxy with no per-client limits, with them in the process, and with them in Redis (Debian's
# redis-server) on loopback and one simulated network round trip away (a PING's time through it is measured and shown).
LIMITS_CLIENTS = 1
LIMITS_SECONDS = 5.0
LIMITS_REDIS_DELAY = 0.001  # seconds each way; the relay's timer makes a round trip about 2.5 ms: measured, shown
LIMIT_FLAGS = ("--rate-limit-rpm", "100000000", "--rate-limit-tpm", "1000000000000", "--max-streams-per-client",
               "10000", "--token-budget-day", "1000000000000")

# quiet: QUIET streams open at once, each a chunk every 10 s (a reasoning model thinking), heartbeats at their
# default, no stream cap: every one served? the proxy's memory, CPU and threads, /healthz while they run.
QUIET = (8000, 3, 10.0, 0.0)
QUIET_FLAGS = ("--max-streams", "0", "--max-connections", "8200")

# workers: WORKERS=1 and WORKERS=2 (each also with LIMIT_FLAGS: limits kept in the process, or by the master),
# side by side in WORKERS_ROUNDS turns, in two layouts: "pinned" (every proxy process on the first CPU, the
# harness on the others: what the master and a second worker cost), and "shared" (proxy and harness on every
# CPU: what a second worker gains on a machine whose harness takes a core). A turn: WORKERS_STREAMS streams of
# WORKERS_CHUNKS chunks as fast as they go (chunks a second, CPU a chunk), then WORKERS_CLIENTS kept-alive
# clients sending one-chunk requests back to back for WORKERS_SECONDS (requests a second, CPU a request).
WORKERS_ROUNDS = 3
WORKERS_STREAMS, WORKERS_CHUNKS = 20, 1000
WORKERS_CLIENTS, WORKERS_SECONDS = 16, 3.0
WORKERS_SYSTEMS = (("WORKERS=1", "1", ()), ("WORKERS=2", "2", ()), ("WORKERS=1+limits", "1", LIMIT_FLAGS),
                   ("WORKERS=2+limits", "2", LIMIT_FLAGS), ("WORKERS=2+redis", "2", LIMIT_FLAGS))

# requests: REQUESTS one-chunk streams one after another on one kept-alive connection (what a request costs),
# each system in REQUEST_ROUNDS turns.
REQUESTS = 4000
REQUEST_ROUNDS = 8
# burst: each of BURST_CLIENTS clients starts within RAMP seconds and sends BURST_REQUESTS_PER_CLIENT streams of
# BURST_CHUNKS chunks BURST_GAP s apart one after another, each on a new connection; no stream cap.
BURST_CLIENTS = (1000, 500)  # the larger first: each 500 then follows a 1000, whichever system runs
BURST_REQUESTS_PER_CLIENT = 3
BURST_CHUNKS, BURST_GAP = 50, 0.1

# --with-routes: three upstream keys, and two routes (OA_ROUTES) to the same upstream with three keys of their
# own; the bench's models (OA_MODEL on /message, "bench" on /v1) match the second route, after the first's patterns.
ROUTE_KEYS = {"BENCH_ROUTE_KEYS": ",".join(openai_like_key(seed) for seed in (3, 4, 5))}
ROUTE_FLAGS = ("--api-key", ",".join(openai_like_key(seed) for seed in (0, 1, 2)), "--routes", json.dumps([
    {"models": ["llama*", "mistral-large"], "upstreams": [{"url": "{upstream}", "keys": "BENCH_ROUTE_KEYS"}]},
    {"models": ["bench", "gpt-4o-mini"], "upstreams": [{"url": "{upstream}", "keys": "BENCH_ROUTE_KEYS"}]}]))

# What runs in front of the upstream, by name: (the checkout whose proxy.py runs, its extra flags). This
# checkout; --baseline's worktree if given; with --with-limits, this checkout with LIMIT_FLAGS. The
# extra systems run only in the scenarios that have reference rows (REFERENCED), as nginx does, on /v1.
SYSTEMS = {"proxy.py": (HERE, ())}
REFERENCED = ("requests", "burst", "realtime")

SCENARIOS = {
    "latency": (50, 100, 0.02, 0.0),
    "concurrency": (500, 50, 0.1, 0.0),
    "throughput": (20, 2000, 0.0, 0.0),
    "thinking": (2000, 5, 0.1, 30.0),
    "abort": (100, 1000, 0.02, 0.0),  # the clients leave after 10 chunks
    "overload": OVERLOAD,
    "keepalive": KEEPALIVE,
    "flood": (FLOOD_ATTACKERS, 5, 0.01, 0.0),
    "siege": (SIEGE_WRK, 5, 0.01, 0.0),
    "rtt": RTT,
    "limits": KEEPALIVE,
    "requests": (1, 1, 0.0, 0.0),
    "burst": (max(BURST_CLIENTS), BURST_CHUNKS, BURST_GAP, 0.0),
    "realtime": (200, 100, 0.02, 0.0),
    "quiet": QUIET,  # REALTIME_SESSIONS, REALTIME_EVENTS, REALTIME_GAP (set below)
    "workers": (WORKERS_STREAMS, WORKERS_CHUNKS, 0.0, 0.0),
}
ABORT_AFTER = 10
ROUTES = ("/message", "/v1/chat/completions")


# --------------------------------------------------------------------------
# The upstream
# --------------------------------------------------------------------------

class Upstream:
    """An OpenAI-like streaming server: a script per request, and a count of streams cut short."""

    def __init__(self, tls=None):
        self.chunks, self.gap, self.think = 0, 0.0, 0.0
        self.usage = False      # end each stream with a usage chunk, as OpenAI does when asked for it
        self.tls = tls          # an ssl.SSLContext to serve HTTPS with, or None
        self.phase = "direct"   # which run a request belongs to
        self.closed_early = []  # (phase, monotonic time) of each stream whose reader went away
        self.connections = 0    # connections accepted

    async def start(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.tasks = set()
        self.accepting = asyncio.ensure_future(self.accept())
        return self.listener.getsockname()[1]

    async def accept(self):
        # One connection per turn of the loop. asyncio's own server accepts every
        # pending connection in one callback; when the proxy opened its upstream
        # connections in a burst, that stalled this loop, and every client in it,
        # for up to 70 ms, which the proxy's latency was then charged with.
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self.listener)
            # As real servers do (Go's net/http by default): without it a kept-alive
            # connection's next answer waits 40 ms on Nagle and a delayed ACK.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            task = asyncio.ensure_future(self.serve_connection(connection))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def close(self):
        """Stop accepting, and end the connections still open (the proxy's kept-alive ones)."""
        self.accepting.cancel()
        self.listener.close()
        for task in self.tasks:
            task.cancel()

    async def serve_connection(self, connection):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=65536)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=connection, ssl=self.tls)
        except (OSError, ssl.SSLError):
            connection.close()
            return
        await self.serve(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def serve(self, reader, writer):
        """Answer requests on one connection until the client closes it (keep-alive)."""
        phase = self.phase
        try:
            while not reader.at_eof():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                await self.answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_early.append((phase, time.monotonic()))
        finally:
            writer.close()

    async def answer(self, reader, writer):
        """One streamed chat completion."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        if self.think:
            await asyncio.sleep(self.think)
        for index in range(self.chunks):
            stamp = repr(time.time())
            event = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
                     b'"model":"bench","choices":[{"index":0,"delta":{"content":"' + stamp.encode()
                     + b' "},"finish_reason":null}]}\n\n')
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            if reader.at_eof():
                raise ConnectionResetError
            if self.gap:
                await asyncio.sleep(self.gap)
        done = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
                b'"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        if self.usage:
            done += (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
                     b'"model":"bench","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d,'
                     b'"total_tokens":%d}}\n\n' % (self.chunks, self.chunks + 1))
        done += b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()


# --------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------

STAMP = re.compile(rb"(\d{10}\.\d+) ")


def request_bytes(route):
    """A streamed chat completion request, in the shape the route takes."""
    body = (json.dumps({"messages": [{"role": "user", "content": "bench"}]}) if route == "/message"
            else json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "b"}],
                             "stream_options": {"include_usage": True}})).encode()
    return (b"POST %b HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (route.encode(), len(body), body))


async def read_head(reader):
    """The status and the head of a response."""
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def read_chunks(reader, writer, results, leave_after=None):
    """Read a chunked stream to its end, noting each chunk's delay from its stamp and the gaps between chunks.

    Returns the number of chunks, or None when the client left after leave_after.
    """
    seen, last = 0, None
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readexactly(2)  # the empty trailer: the connection may take the next request
            return seen
        data = await reader.readexactly(size + 2)
        now = time.time()
        if last is not None:
            results["gaps"].append(now - last)
        last = now
        for stamp in STAMP.findall(data):
            results["delays"].append(now - float(stamp))
            if seen:  # a stream's first chunk also carries the proxy's per-request setup
                results["steady"].append(now - float(stamp))
            seen += 1
        if leave_after and seen >= leave_after:
            writer.transport.abort()  # the client goes away mid-stream
            results["chunks"] += seen
            return None


@contextlib.asynccontextmanager
async def connection(port):
    """A connection to a loopback port, closed however the block ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def stream(port, route, results, leave_after=None, stagger=0.0):
    """One client: post, read the chunked stream; a 503 is noted as a refusal."""
    await asyncio.sleep(random.uniform(0, stagger))
    started = time.time()
    try:
        async with connection(port) as (reader, writer):
            writer.write(request_bytes(route))
            status, head = await read_head(reader)
            results["ttfb"].append(time.time() - started)
            results["last_head_at"] = max(results["last_head_at"], time.monotonic())
            if status == 503:
                results["refused"].append(time.time() - started)
                results["retry_after"] += b"\r\nretry-after:" in head.lower()
                return
            if status != 200:
                raise ValueError(head.split(b"\r\n", 1)[0].decode())
            seen = await read_chunks(reader, writer, results, leave_after)
            if seen is not None:
                results["chunks"] += seen
                results["served"] += 1
    except (OSError, ValueError, asyncio.IncompleteReadError) as error:
        results["errors"].append(repr(error))


def new_results():
    return {"ttfb": [], "delays": [], "steady": [], "gaps": [], "chunks": 0, "served": 0, "errors": [],
            "refused": [], "retry_after": 0, "latency": [], "last_head_at": 0.0}


async def run_clients(port, route, streams, leave_after=None, stagger=0.0):
    results = new_results()
    started = time.monotonic()
    await asyncio.gather(*(stream(port, route, results, leave_after, stagger) for _ in range(streams)))
    results["seconds"] = time.monotonic() - started
    return results


async def keep_alive_client(port, route, results, until):
    """One client on one kept-alive connection, sending its next request as soon as the last one ends."""
    try:
        async with connection(port) as (reader, writer):
            while time.monotonic() < until:
                started = time.monotonic()
                writer.write(request_bytes(route))
                status, head = await read_head(reader)
                if status != 200:
                    raise ValueError(head.split(b"\r\n", 1)[0].decode())
                await read_chunks(reader, writer, results)
                results["latency"].append(time.monotonic() - started)
    except (OSError, ValueError, asyncio.IncompleteReadError) as error:
        results["errors"].append(repr(error))


def probe(port, seconds):
    """GET /healthz on a new connection every PROBE_EVERY seconds, as a load balancer does; then /metrics
    for the number of streams running.

    Runs in a process of its own (--probe), so that its times are not the
    harness's event loop's, busy with every stream. Prints one JSON object.
    """
    latencies, failures, active = [], [], []  # active[i]: the streams running just after latencies[i], or None
    times = []  # when each of latencies began (time.monotonic(): one clock for every process of the machine)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            status = response.status
            latencies.append(time.monotonic() - started)
            times.append(started)
            active.append(None)
            if status != 200:
                failures.append(status)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            active[-1] = int(float(re.search(r"^proxy_active_streams (\S+)$", text, re.M).group(1)))
            conn.close()
        except (OSError, http.client.HTTPException) as error:
            failures.append(repr(error))
        time.sleep(max(0.0, started + PROBE_EVERY - time.monotonic()))
    print(json.dumps({"latencies": latencies, "failures": failures, "active": active, "times": times}))


def probe_message(port, seconds):
    """POST /message on a new connection every PROBE_EVERY seconds, as a new client would; print the outcomes.

    Each outcome is "served" (the whole stream), "503" (with Retry-After),
    another status, or "no answer" (reset, closed or timed out with no HTTP reply).
    """
    outcomes, times = [], []
    body = json.dumps({"messages": [{"role": "user", "content": "probe"}]})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/message", body=body)
            response = conn.getresponse()
            text = response.read()
            conn.close()
            if response.status == 200 and text.rstrip().endswith(b"}") and b"event:done" in text:
                outcomes.append("served")
            elif response.status == 503 and response.getheader("Retry-After"):
                outcomes.append("503")
            else:
                outcomes.append(str(response.status))
            times.append(time.monotonic() - started)
        except (OSError, http.client.HTTPException):
            outcomes.append("no answer")
        time.sleep(max(0.0, started + PROBE_EVERY - time.monotonic()))
    print(json.dumps({"outcomes": outcomes, "times": times}))


class Prober:
    """probe() in a subprocess, on the harness's CPU."""

    def __init__(self, port, seconds, kind="--probe"):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), kind, str(port),
                                         str(seconds)], stdout=subprocess.PIPE, text=True)

    def result(self):
        out, _ = self.process.communicate(timeout=120)
        return json.loads(out)


# --------------------------------------------------------------------------
# The proxy process
# --------------------------------------------------------------------------

class ProxyProcess:
    """proxy.py in a subprocess, pinned to a CPU, read through /proc and its /metrics.

    `home` is the checkout whose proxy.py runs: this one, or --baseline's worktree.
    """

    home = HERE

    def __init__(self, upstream_port, cpu, args=UNLIMITED, base_url=None, env=None, cpus=None):
        # The access log goes to a file, as in a deployment: a closed pipe would make each line fail fast.
        # The proxy appends to it and this reads it through a file of its own: a shared file offset
        # let a seek here send the proxy's next line over its first ones.
        fd, self.log_path = tempfile.mkstemp(prefix="bench-proxy-", suffix=".log")
        os.close(fd)
        with open(self.log_path, "a") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(self.home, "proxy.py"), "--port", "0", "--api-key", BENCH_KEY,
                 "--base-url", base_url or f"http://127.0.0.1:{upstream_port}/v1", "--max-connections", "4096",
                 *args], stdout=subprocess.DEVNULL, stderr=stderr, text=True, env={**os.environ, **(env or {})},
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)  # its workers inherit it
        self.log = open(self.log_path)
        deadline = time.monotonic() + 30
        found = None
        while found is None and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.01)
            self.log.seek(0)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read())
        if found is None:
            code = self.process.poll()
            self.process.kill()
            self.log.seek(0)
            said = self.log.read()[-2000:]
            self.log.close()
            os.remove(self.log_path)
            raise RuntimeError(f"proxy.py did not start listening within 30 s (exit status {code}); it said: {said}")
        self.port = int(found.group(1))
        if cpu is not None:
            # Every thread, not just the main one: a thread started later inherits
            # its creator's CPUs, and the proxy's workers are started by its pool thread.
            for thread in os.listdir(f"/proc/{self.process.pid}/task"):
                os.sched_setaffinity(int(thread), {cpu})

    def tree_cpu_seconds(self):
        """CPU time of the proxy and its workers (WORKERS), from /proc: every process of the tree, now, where
        /metrics has the workers' figures as they sent them last (a second old at most)."""
        pids = [self.process.pid] + [int(entry) for entry in os.listdir("/proc") if entry.isdigit()
                                     and parent_of(int(entry)) == self.process.pid]
        return sum(process_cpu_seconds(pid) for pid in pids)

    def log_lines(self):
        """Lines the proxy has logged so far."""
        self.log.seek(0)
        return sum(1 for _ in self.log)

    def cpu_seconds(self):
        """The proxy's process_cpu_seconds_total: to the microsecond, where /proc counts 10 ms ticks."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return float(re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M).group(1))

    def status(self, name):
        with open(f"/proc/{self.process.pid}/status") as status:
            return int(re.search(rf"^{name}:\s+(\d+)", status.read(), re.M).group(1))

    def sockets(self):
        folder = f"/proc/{self.process.pid}/fd"
        count = 0
        for fd in os.listdir(folder):
            try:
                count += os.readlink(os.path.join(folder, fd)).startswith("socket:")
            except FileNotFoundError:  # closed since the listing
                pass
        return count

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()
        os.remove(self.log_path)


def process_cpu_seconds(pid):
    """A process's CPU time, user and system, from /proc (10 ms ticks); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            ticks = sum(int(field) for field in stat.read().rpartition(")")[2].split()[11:13])
    except OSError:
        return 0.0
    return ticks / os.sysconf("SC_CLK_TCK")


def parent_of(pid):
    """A process's parent, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except OSError:
        return None


# --------------------------------------------------------------------------
# Scenarios and the report
# --------------------------------------------------------------------------

def percentile(values, share):
    if len(values) < 2:
        return (values or [0])[0]
    return statistics.quantiles(values, n=100, method="inclusive")[share - 1]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


async def overload(route, cpus, proxy_args, shape=None):
    """More streams than the proxy can relay well: who is served, at what pace, and who is refused how."""
    streams, chunks, gap, think = shape or OVERLOAD
    upstream = Upstream()
    upstream.chunks, upstream.gap, upstream.think = chunks, gap, think
    upstream_port = await upstream.start()
    random.seed(streams)
    direct = await run_clients(upstream_port, route if route != "/message" else "/v1/chat/completions",
                               streams, stagger=RAMP)
    upstream.phase = "proxy"
    proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None, proxy_args)
    try:
        await run_clients(proxy.port, route, 1)
        prober = Prober(proxy.port, RAMP + chunks * gap)
        random.seed(streams)
        via = await run_clients(proxy.port, route, streams, stagger=RAMP)
        probed = prober.result()
        latencies, failures = probed["latencies"], probed["failures"]
        return {"scenario": "overload", "route": route, "streams": streams, "served": via["served"],
                "gap_p99_ms": ms(percentile(via["gaps"], 99)), "direct_gap_p99_ms": ms(percentile(direct["gaps"], 99)),
                "gap_max_ms": ms(max(via["gaps"], default=None)),
                "refused": len(via["refused"]), "with_retry_after": via["retry_after"],
                "refusal_p99_ms": ms(percentile(via["refused"], 99)) if via["refused"] else None,
                "refusal_max_ms": ms(max(via["refused"], default=None)),
                "unanswered": len(via["errors"]),
                "healthz_p50_ms": ms(percentile(latencies, 50)), "healthz_p99_ms": ms(percentile(latencies, 99)),
                "healthz_max_ms": ms(max(latencies, default=None)), "healthz_failed": len(failures),
                "active_max": max((n for n in probed["active"] if n is not None), default=None),
                "peak_rss_mb": round(proxy.status("VmHWM") / 1024, 1),
                "sample_error": (via["errors"] or [None])[0]}
    finally:
        proxy.stop()
        upstream.close()


async def quiet(route, cpus, proxy_args):
    """Many streams open at once, each nearly silent: what holding them costs the proxy, and whether it
    still answers /healthz at once."""
    streams, chunks, gap, think = QUIET
    upstream = Upstream()
    upstream.chunks, upstream.gap, upstream.think = chunks, gap, think
    upstream_port = await upstream.start()
    upstream.phase = "proxy"
    proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None, (*QUIET_FLAGS, *proxy_args))
    peaks = {"Threads": 0, "VmRSS": 0}
    running = {}  # the threads once every stream has started, between two chunks, and the burst's workers gone

    async def sample():
        started = time.monotonic()
        while True:
            for name in peaks:
                peaks[name] = max(peaks[name], proxy.status(name))
            if "threads" not in running and time.monotonic() - started > RAMP + gap * (chunks - 0.5):
                running["threads"] = proxy.status("Threads")
            await asyncio.sleep(0.5)

    try:
        cpu_before = proxy.cpu_seconds()
        prober = Prober(proxy.port, RAMP + chunks * gap)
        sampler = asyncio.ensure_future(sample())
        via = await run_clients(proxy.port, route, streams, stagger=RAMP)
        sampler.cancel()
        probed = prober.result()
        latencies = probed["latencies"]
        # "While they run": the probes made once every stream had its head, none still starting (the
        # ramp, 8,000 requests within a second, keeps the one core busy for seconds on its own).
        steady = [(latency, at - via["last_head_at"]) for latency, at in zip(latencies, probed["times"])
                  if at >= via["last_head_at"]]
        running_latencies = [latency for latency, _ in steady]
        return {"scenario": "quiet", "route": route, "streams": streams, "served": via["served"],
                "errors": len(via["errors"]) + len(via["refused"]), "cpu_s": round(proxy.cpu_seconds() - cpu_before, 2),
                "gap_p99_ms": ms(percentile(via["gaps"], 99)), "threads_max": peaks["Threads"],
                "threads_running": running.get("threads"),
                "rss_max_mb": round(peaks["VmRSS"] / 1024, 1), "peak_rss_mb": round(proxy.status("VmHWM") / 1024, 1),
                "healthz_p50_ms": ms(percentile(latencies, 50)), "healthz_p99_ms": ms(percentile(latencies, 99)),
                "healthz_max_ms": ms(max(latencies, default=None)), "healthz_failed": len(probed["failures"]),
                "running_probes": len(running_latencies),
                "running_healthz_p99_ms": ms(percentile(running_latencies, 99)) if running_latencies else None,
                "running_healthz_max_ms": ms(max(running_latencies, default=None)),
                "running_slowest_at_s": round(max(steady, default=(0, 0))[1], 2),
                "sample_error": (via["errors"] or [None])[0]}
    finally:
        proxy.stop()
        upstream.close()


async def keepalive(route, cpus, proxy_args):
    """Clients sending requests back to back on kept-alive connections: each request's time."""
    clients, chunks, gap, think = KEEPALIVE
    upstream = Upstream()
    upstream.chunks, upstream.gap, upstream.think = chunks, gap, think
    upstream_port = await upstream.start()
    direct = new_results()
    until = time.monotonic() + KEEPALIVE_SECONDS
    direct_route = route if route != "/message" else "/v1/chat/completions"
    await asyncio.gather(*(keep_alive_client(upstream_port, direct_route, direct, until) for _ in range(clients)))
    proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None, proxy_args)
    try:
        via = new_results()
        until = time.monotonic() + KEEPALIVE_SECONDS
        await asyncio.gather(*(keep_alive_client(proxy.port, route, via, until) for _ in range(clients)))
        return {"scenario": "keepalive", "route": route, "clients": clients, "requests": len(via["latency"]),
                "direct_requests": len(direct["latency"]), "errors": len(via["errors"]),
                "p50_ms": ms(percentile(via["latency"], 50)), "p99_ms": ms(percentile(via["latency"], 99)),
                "max_ms": ms(max(via["latency"], default=None)),
                "direct_p50_ms": ms(percentile(direct["latency"], 50)),
                "direct_max_ms": ms(max(direct["latency"], default=None)),
                "sample_error": (via["errors"] or [None])[0]}
    finally:
        proxy.stop()
        upstream.close()


async def attacker(kind, port, until):
    """One attacker, holding a connection as cheaply as its kind allows and coming back when cut off.

    slowloris: a request head trickled a header line every 2 s; slowbody: a
    /message body trickled a byte every 2 s; connections: requests back to
    back on a kept-alive connection, as wrk does.
    """
    await asyncio.sleep(random.uniform(0, min(2.0, until - time.monotonic())))
    while time.monotonic() < until:
        try:
            async with connection(port) as (reader, writer):
                if kind == "connections":
                    while time.monotonic() < until:
                        writer.write(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n\r\n")
                        _, head = await read_head(reader)
                        await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
                    continue
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n" if kind == "slowloris" else
                             b"POST /message HTTP/1.1\r\nHost: flood\r\nContent-Length: 1000\r\n\r\n{")
                while time.monotonic() < until and not reader.at_eof():
                    await asyncio.sleep(min(2.0, max(0.0, until - time.monotonic())))
                    writer.write(b"X-Slow: 1\r\n" if kind == "slowloris" else b" ")
                    await writer.drain()
        except (OSError, ValueError, AttributeError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.5)  # cut off or refused: come back, as an attacker does


def probe_counts(outcomes):
    """How the probes of a flood ended: served, told 503, no answer, or another status."""
    known = ("served", "503", "no answer")
    return {"probes": len(outcomes), "served": outcomes.count("served"), "told_503": outcomes.count("503"),
            "no_answer": outcomes.count("no answer"), "other": len(outcomes) - sum(map(outcomes.count, known))}


async def flood(cpus, proxy_args, seconds=FLOOD_SECONDS):
    """Each flood for `seconds` against the proxy's defaults: are new clients served or told 503?"""
    rows = []
    for kind in FLOODS:
        upstream = Upstream()
        upstream.chunks, upstream.gap = 5, 0.01
        upstream_port = await upstream.start()
        proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None, ("--max-connections", "2048", *proxy_args))
        try:
            log_before = proxy.log_lines()
            until = time.monotonic() + seconds
            attackers = [asyncio.ensure_future(attacker(kind, proxy.port, until)) for _ in range(FLOOD_ATTACKERS)]
            settle = min(3.0, seconds / 4)  # the attackers are in
            await asyncio.sleep(settle)
            prober = Prober(proxy.port, seconds - settle, "--probe-message")
            while prober.process.poll() is None:
                await asyncio.sleep(0.2)
            probed = prober.result()
            await asyncio.gather(*attackers)
            await asyncio.sleep(0.1)  # the attackers' sockets close on the loop's next turns, before the proxy stops
            rows.append({"scenario": "flood", "route": "/message", "flood": kind, "attackers": FLOOD_ATTACKERS,
                         "seconds": seconds, **probe_counts(probed["outcomes"]),
                         "probe_p99_ms": ms(percentile(probed["times"], 99)) if probed["times"] else None,
                         "log_lines": proxy.log_lines() - log_before,
                         "peak_rss_mb": round(proxy.status("VmHWM") / 1024, 1)})
        finally:
            proxy.stop()
            upstream.close()
    return rows


def listen_drops():
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenDrops)."""
    with open("/proc/net/netstat") as netstat:
        names, values = [line.split() for line in netstat if line.startswith("TcpExt:")][:2]
    return int(values[names.index("ListenDrops")])


def siege_tool(name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"the siege scenario needs {name} (Debian's package {name})")
    return path


async def siege(cpus, proxy_args, system, seconds=FLOOD_SECONDS):
    """slowhttptest and wrk against /healthz, a new client's POST /message every PROBE_EVERY s: is every probe
    served or told 503 (never reset, never unanswered), and within a second?"""
    wrk, slowhttptest = siege_tool("wrk"), siege_tool("slowhttptest")
    upstream = Upstream()
    upstream.chunks, upstream.gap = 5, 0.01
    upstream_port = await upstream.start()
    if system == "nginx":
        target = NginxProcess(upstream_port, cpus[0] if cpus else None)
    else:
        ProxyProcess.home = SYSTEMS[system][0]
        target = ProxyProcess(upstream_port, cpus[0] if cpus else None,
                              ("--max-connections", "2048", *SYSTEMS[system][1], *proxy_args))
    url = f"http://127.0.0.1:{target.port}/healthz"
    tools = []
    try:
        drops_before = listen_drops()
        settle = min(3.0, seconds / 4)
        tools.append(subprocess.Popen(
            [slowhttptest, "-H", "-c", str(SIEGE_SLOW), "-r", str(SIEGE_SLOW_RATE), "-l", str(int(seconds + 2 * settle)),
             "-u", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(settle)  # the slow connections are opening
        tools.append(subprocess.Popen(
            [wrk, f"-c{SIEGE_WRK}", f"-t{min(2, SIEGE_WRK)}", f"-d{max(1, round(seconds))}s", url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        await asyncio.sleep(settle)  # wrk's clients are in
        prober = Prober(target.port, seconds - 2 * settle, "--probe-message")
        while prober.process.poll() is None:
            await asyncio.sleep(0.2)
        probed = prober.result()
        drops = listen_drops() - drops_before
        wrk_out, _ = tools[1].communicate(timeout=seconds + 30)
        rate = re.search(r"Requests/sec:\s*([\d.]+)", wrk_out)
        times = probed["times"]
        return {"scenario": "siege", "route": "/message", "system": system, "slow": SIEGE_SLOW, "wrk": SIEGE_WRK,
                "seconds": seconds, **probe_counts(probed["outcomes"]),
                "probe_p50_ms": ms(percentile(times, 50)) if times else None,
                "probe_p99_ms": ms(percentile(times, 99)) if times else None,
                "probe_max_ms": ms(max(times, default=None)),
                "over_1s": sum(1 for t in times if t > 1.0), "listen_drops": drops,
                "wrk_requests_per_s": round(float(rate.group(1))) if rate else None}
    finally:
        for tool in tools:
            tool.kill()
            tool.wait(10)
        target.stop()
        upstream.close()


class Relay:
    """A network in between: every byte is held `delay` seconds each way, and a new connection's first
    bytes wait one round trip more (TCP's handshake). Order is kept; nothing is lost."""

    def __init__(self, target_port, delay):
        self.target_port, self.delay = target_port, delay

    async def start(self):
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def close(self):
        self.server.close()

    async def relay(self, client_reader, client_writer):
        ready_at = time.monotonic() + 2 * self.delay  # the handshake's round trip
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, upstream_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self.pump(client_reader, upstream_writer, ready_at),
                                 self.pump(upstream_reader, client_writer, ready_at), return_exceptions=True)
        except asyncio.CancelledError:  # the run is over with the connection still kept alive
            client_writer.close()
            upstream_writer.close()

    async def pump(self, reader, writer, ready_at):
        """Bytes from one side to the other, each piece `delay` after it arrived (and not before ready_at)."""
        queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((max(time.monotonic() + self.delay, ready_at), data))
                if not data:
                    break
        except OSError:
            await queue.put((0.0, b""))
        await delivering


async def timed_requests(port, route, count, tls=None):
    """`count` requests one after another on one kept-alive connection: the time to each first byte."""
    times = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        for _ in range(count):
            started = time.monotonic()
            writer.write(request_bytes(route))
            status, head = await read_head(reader)
            times.append(time.monotonic() - started)
            if status != 200:
                raise ValueError(head.split(b"\r\n", 1)[0].decode())
            await read_chunks(reader, writer, new_results())
    finally:
        writer.close()
    return times


def self_signed_certificate(folder):
    """A certificate for 127.0.0.1 and its key, made for this run by the openssl command: (cert file, key file)."""
    cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key_file, "-out", cert_file], check=True, capture_output=True)
    return cert_file, key_file


async def rtt(route, cpus, proxy_args):
    """Time to the first byte with an upstream a network away: connections kept or opened anew."""
    folder = tempfile.mkdtemp(prefix="bench-rtt-")
    cert_file, key_file = self_signed_certificate(folder)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_file, key_file)
    client_tls = ssl.create_default_context(cafile=cert_file)
    upstream = Upstream(server_tls)
    upstream.chunks, upstream.gap, upstream.think = RTT[1], RTT[2], RTT[3]
    relay = Relay(await upstream.start(), RTT_DELAY)
    relay_port = await relay.start()
    proxy = ProxyProcess(None, cpus[0] if cpus else None, (*UNLIMITED, *proxy_args),
                         base_url=f"https://127.0.0.1:{relay_port}/v1", env={"SSL_CERT_FILE": cert_file})
    try:
        opened = upstream.connections
        direct = await timed_requests(relay_port, "/v1/chat/completions", RTT_SEQUENTIAL, client_tls)
        direct_opened = upstream.connections - opened
        opened = upstream.connections
        via = await timed_requests(proxy.port, route, RTT_SEQUENTIAL)
        via_opened = upstream.connections - opened
        waves = []
        for _ in range(2):
            opened = upstream.connections
            results = await run_clients(proxy.port, route, RTT_WAVE)
            waves.append((results, upstream.connections - opened))
        errors = sum(len(results["errors"]) for results, _ in waves)
        return {"scenario": "rtt", "route": route, "rtt_ms": ms(2 * RTT_DELAY), "sequential": RTT_SEQUENTIAL,
                "direct_p50_ms": ms(percentile(direct, 50)), "ttfb_p50_ms": ms(percentile(via, 50)),
                "ttfb_p99_ms": ms(percentile(via, 99)),
                "added_p50_ms": ms(percentile(via, 50) - percentile(direct, 50)),
                "direct_opened": direct_opened, "opened": via_opened, "wave": RTT_WAVE,
                "wave1_p50_ms": ms(percentile(waves[0][0]["ttfb"], 50)),
                "wave2_p50_ms": ms(percentile(waves[1][0]["ttfb"], 50)),
                "wave2_p99_ms": ms(percentile(waves[1][0]["ttfb"], 99)),
                "wave1_opened": waves[0][1], "wave2_opened": waves[1][1], "errors": errors,
                "sample_error": next((r["errors"][0] for r, _ in waves if r["errors"]), None)}
    finally:
        proxy.stop()
        relay.close()
        upstream.close()
        for name in (cert_file, key_file):
            os.remove(name)
        os.rmdir(folder)


def free_port():
    """A loopback port nobody listens on now, for a server started here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts_within(port, seconds):
    """True once a loopback port accepts connections, within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class NginxProcess:
    """Debian's nginx, one worker, in front of the upstream as a C reference: proxy_buffering off, upstream
    keepalive, no access log, /healthz answered by nginx itself as proxy.py answers its own. It has the proxy's interface for what the scenarios read (port, CPU, RSS)."""

    def __init__(self, upstream_port, cpu):
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            raise RuntimeError("the nginx reference needs nginx (Debian's package nginx-light or nginx)")
        self.folder = tempfile.mkdtemp(prefix="bench-nginx-")
        self.port = free_port()
        temp = "".join(f"{kind}_temp_path {self.folder}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = os.path.join(self.folder, "nginx.conf")
        with open(conf, "w") as out:
            out.write(f"daemon off;\nuser root;\nworker_processes 1;\nworker_rlimit_nofile 65536;\n"
                      f"pid {self.folder}/nginx.pid;\nerror_log {self.folder}/error.log crit;\n"
                      f"events {{ worker_connections 16384; }}\nhttp {{\naccess_log off;\n{temp}"
                      f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 1024; }}\n"
                      f"map $http_upgrade $connection_upgrade {{ websocket upgrade; default \"\"; }}\n"
                      f"server {{ listen 127.0.0.1:{self.port} backlog=4096;\n"
                      f"location = /healthz {{ return 200 \"ok\\n\"; }}\nlocation / {{\n"
                      f"proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;\n"
                      f"proxy_set_header Connection $connection_upgrade;\n"
                      f"proxy_buffering off; proxy_read_timeout 600s; }} }}\n}}\n")
        self.process = subprocess.Popen([binary, "-c", conf, "-p", self.folder],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not accepts_within(self.port, 10):
            self.stop()
            raise RuntimeError("nginx did not start within 10 s")
        children = self.children()
        self.worker = children[0] if children else self.process.pid
        if cpu is not None:
            for pid in (self.process.pid, self.worker):
                os.sched_setaffinity(pid, {cpu})

    def children(self):
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as listing:
            return [int(pid) for pid in listing.read().split()]

    def cpu_seconds(self):
        """The worker's time on a CPU, to the nanosecond (schedstat), where /proc's stat counts 10 ms ticks."""
        with open(f"/proc/{self.worker}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9

    def status(self, name):
        with open(f"/proc/{self.worker}/status") as status:
            return int(re.search(rf"^{name}:\s+(\d+)", status.read(), re.M).group(1))

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_system(system, upstream_port, cpus, proxy_args):
    """The system under test in front of the upstream: proxy.py from a checkout, or nginx."""
    cpu = cpus[0] if cpus else None
    if system == "nginx":
        return NginxProcess(upstream_port, cpu)
    ProxyProcess.home, flags = SYSTEMS[system]
    flags = tuple(flag.replace("{upstream}", f"http://127.0.0.1:{upstream_port}/v1") for flag in flags)
    return ProxyProcess(upstream_port, cpu, (*UNLIMITED, *flags, *proxy_args), env=ROUTE_KEYS)


async def requests(route, cpus, proxy_args, systems):
    """REQUESTS one-chunk streams one after another on one kept-alive connection to each system: what a
    request costs. The systems run side by side and take turns, REQUEST_ROUNDS rounds of them, so that a
    busy spell of this shared machine falls on each alike: a system's CPU per request is the median of
    its rounds, shown with their range."""
    upstream = Upstream()
    upstream.chunks = 1
    upstream_port = await upstream.start()
    direct_route = route if route != "/message" else "/v1/chat/completions"
    direct = await timed_requests(upstream_port, direct_route, REQUESTS)
    targets = []
    try:
        for system in systems:
            targets.append(start_system(system, upstream_port, cpus, proxy_args))
            await timed_requests(targets[-1].port, route, 50)  # warm: threads, pooled connections
        each = REQUESTS // REQUEST_ROUNDS
        cpu = {system: [] for system in systems}
        via = {system: [] for system in systems}
        seconds = dict.fromkeys(systems, 0.0)
        for _ in range(REQUEST_ROUNDS):
            for system, target in zip(systems, targets):
                cpu_before, started = target.cpu_seconds(), time.monotonic()
                via[system] += await timed_requests(target.port, route, each)
                seconds[system] += time.monotonic() - started
                cpu[system].append((target.cpu_seconds() - cpu_before) / each * 1e6)
        return [{"scenario": "requests", "route": route, "system": system, "requests": each * REQUEST_ROUNDS,
                 "cpu_us_per_request": round(statistics.median(cpu[system]), 1),
                 "cpu_us_range": f"{min(cpu[system]):.0f}-{max(cpu[system]):.0f}",
                 "requests_per_s": round(each * REQUEST_ROUNDS / seconds[system]),
                 "direct_ttfb_p50_ms": ms(percentile(direct, 50)), "ttfb_p50_ms": ms(percentile(via[system], 50)),
                 "added_ttfb_p50_ms": round((percentile(via[system], 50) - percentile(direct, 50)) * 1000, 3),
                 "added_ttfb_p99_ms": round((percentile(via[system], 99) - percentile(direct, 99)) * 1000, 3)}
                for system in systems]
    finally:
        for target in targets:
            target.stop()
        upstream.close()


async def workers_turn(port, route, upstream, cpu_seconds):
    """One turn of the workers scenario against one port: chunks/s, CPU s a chunk, requests/s, CPU s a
    request, the limits' store's CPU s a request (the master's, or Redis's), errors. cpu_seconds() gives
    (every process of the system, the store's)."""
    upstream.chunks = WORKERS_CHUNKS
    before = cpu_seconds()[0]
    streams = await run_clients(port, route, WORKERS_STREAMS)
    chunk_cpu = (cpu_seconds()[0] - before) / max(1, len(streams["delays"]))
    upstream.chunks = 1
    results, (before, store_before) = new_results(), cpu_seconds()
    until = time.monotonic() + WORKERS_SECONDS
    await asyncio.gather(*(keep_alive_client(port, route, results, until) for _ in range(WORKERS_CLIENTS)))
    after, store_after = cpu_seconds()
    served = max(1, len(results["latency"]))
    errors = len(streams["errors"]) + len(streams["refused"]) + len(results["errors"])
    return (len(streams["delays"]) / streams["seconds"], chunk_cpu, len(results["latency"]) / WORKERS_SECONDS,
            (after - before) / served, (store_after - store_before) / served, errors)


def workers_cpu(target, name, redis):
    """cpu_seconds() of workers_turn for one system: its processes (and Redis), and its limits' store."""
    if name.endswith("+redis"):
        return lambda: (target.tree_cpu_seconds() + process_cpu_seconds(redis.process.pid),
                        process_cpu_seconds(redis.process.pid))
    if name == "WORKERS=2+limits":
        return lambda: (target.tree_cpu_seconds(), process_cpu_seconds(target.process.pid))
    return lambda: (target.tree_cpu_seconds(), 0.0)


async def workers(route, cpus, proxy_args):
    """WORKERS=1 against WORKERS=2, with and without per-client limits, pinned apart and sharing the CPUs;
    the direct path's turn beside them is the harness's own pace."""
    if len(cpus) < 2:
        raise SystemExit("the workers scenario needs two CPUs")
    upstream = Upstream()
    upstream.usage = True
    upstream_port = await upstream.start()
    redis = RedisServer()
    direct_route = route if route != "/message" else "/v1/chat/completions"
    rows = []
    try:
        for layout, proxy_cpus, harness_cpus in (("pinned", {cpus[0]}, set(cpus[1:])),
                                                 ("shared", set(cpus), set(cpus))):
            os.sched_setaffinity(0, harness_cpus)
            os.sched_setaffinity(redis.process.pid, proxy_cpus)  # a store beside the proxy, on its CPUs
            targets = []
            try:
                for name, count, flags in WORKERS_SYSTEMS:
                    env = {"WORKERS": count, **({"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
                                                if name.endswith("+redis") else {})}
                    targets.append(ProxyProcess(upstream_port, None, (*UNLIMITED, *flags, *proxy_args), env=env,
                                                cpus=proxy_cpus))
                    await run_clients(targets[-1].port, route, 4)  # warm: threads, pooled connections
                turns = collections.defaultdict(list)
                for _ in range(WORKERS_ROUNDS):
                    turns["direct"].append(await workers_turn(upstream_port, direct_route, upstream,
                                                              lambda: (0.0, 0.0)))
                    for (name, _, _), target in zip(WORKERS_SYSTEMS, targets):
                        turns[name].append(await workers_turn(target.port, route, upstream,
                                                              workers_cpu(target, name, redis)))
                rows += [workers_row(route, layout, name, figures) for name, figures in turns.items()]
            finally:
                for target in targets:
                    target.stop()
    finally:
        os.sched_setaffinity(0, set(cpus[1:]))
        redis.stop()
        upstream.close()
    return rows


def workers_row(route, layout, name, turns):
    """The medians (and ranges) of one system's turns in the workers scenario."""
    row = {"scenario": "workers", "route": route, "layout": layout, "system": name}
    for index, field, scale, digits in ((0, "chunks_per_s", 1, 0), (1, "cpu_us_per_chunk", 1e6, 1),
                                        (2, "requests_per_s", 1, 0), (3, "cpu_us_per_request", 1e6, 1),
                                        (4, "store_cpu_us_per_request", 1e6, 1)):
        values = [turn[index] * scale for turn in turns]
        if (name == "direct" and field.startswith("cpu")) or (field.startswith("store") and not any(values)):
            continue
        row[field] = round(statistics.median(values), digits)
        row[f"{field}_range"] = f"{min(values):.{digits}f}-{max(values):.{digits}f}"
    row["errors"] = sum(turn[5] for turn in turns)
    return row


async def burst_client(port, route, results, left, stagger):
    """One client of a burst: it starts within `stagger` seconds, then opens a new connection for its next
    request the moment its last one ends, while requests are left."""
    while left[0] > 0:
        left[0] -= 1
        await stream(port, route, results, stagger=stagger)
        stagger = 0.0


async def run_burst(port, route, clients, total):
    results, left = new_results(), [total]
    started = time.monotonic()
    await asyncio.gather(*(burst_client(port, route, results, left, RAMP) for _ in range(clients)))
    results["seconds"] = time.monotonic() - started
    return results


async def burst(route, cpus, proxy_args, system, clients):
    """Hundreds of clients starting within a second, a new connection per request: the tail they see."""
    total = clients * BURST_REQUESTS_PER_CLIENT
    upstream = Upstream()
    upstream.chunks, upstream.gap = BURST_CHUNKS, BURST_GAP
    upstream_port = await upstream.start()
    random.seed(clients)
    direct = await run_burst(upstream_port, route if route != "/message" else "/v1/chat/completions",
                             clients, total)
    target = start_system(system, upstream_port, cpus, proxy_args)
    try:
        await run_clients(target.port, route, 1)
        cpu_before = target.cpu_seconds()
        random.seed(clients)
        via = await run_burst(target.port, route, clients, total)
        cpu = target.cpu_seconds() - cpu_before
        delivered = len(via["delays"])
        return {"scenario": "burst", "route": route, "system": system, "clients": clients, "requests": total,
                "served": via["served"], "errors": len(via["errors"]) + len(via["refused"]),
                "chunks_per_s": round(delivered / via["seconds"]),
                "direct_chunks_per_s": round(len(direct["delays"]) / direct["seconds"]),
                "cpu_us_per_chunk": round(cpu / max(1, delivered) * 1e6, 1),
                "added_p99_ms": ms(percentile(via["delays"], 99) - percentile(direct["delays"], 99)),
                "ttfb_p99_ms": ms(percentile(via["ttfb"], 99)),
                "direct_ttfb_p99_ms": ms(percentile(direct["ttfb"], 99)),
                "peak_rss_mb": round(target.status("VmHWM") / 1024, 1),
                "sample_error": (via["errors"] or [None])[0]}
    finally:
        target.stop()
        upstream.close()


class RedisServer:
    """Debian's redis-server on a loopback port, without persistence; for the limits scenario."""

    def __init__(self):
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("the limits scenario needs redis-server (Debian's package redis-server)")
        self.port = free_port()
        self.process = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not accepts_within(self.port, 10):
            self.stop()
            raise RuntimeError("redis-server did not start within 10 s")

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def metric(port, name):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def ping_ms(port, count=20):
    """The median time of a Redis PING on one connection, through whatever is in between."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    try:
        for _ in range(count):
            started = time.monotonic()
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await reader.readline()
            times.append(time.monotonic() - started)
    finally:
        writer.close()
    return round(statistics.median(times[1:]) * 1000, 2)  # the first waits for the simulated handshake too


async def limits(route, cpus, proxy_args):
    """What per-client limits cost a request: none, in the process, in Redis here, in Redis a network away."""
    clients, (_, chunks, gap, think) = LIMITS_CLIENTS, KEEPALIVE
    upstream = Upstream()
    upstream.chunks, upstream.gap, upstream.think = chunks, gap, think
    upstream.usage = True  # so that RATE_LIMIT_TPM and the budget have tokens to count
    upstream_port = await upstream.start()
    redis = RedisServer()
    relay = Relay(redis.port, LIMITS_REDIS_DELAY)
    relay_port = await relay.start()
    direct_route = route if route != "/message" else "/v1/chat/completions"
    row = {"scenario": "limits", "route": route, "clients": clients, "redis_ping_ms": await ping_ms(redis.port),
           "redis_away_ping_ms": await ping_ms(relay_port)}
    runs = (("direct", None, ()), ("none", None, ()), ("process", None, LIMIT_FLAGS),
            ("redis", redis.port, LIMIT_FLAGS), ("redis_away", relay_port, LIMIT_FLAGS))
    try:
        for name, redis_port, flags in runs:
            env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"} if redis_port else {}
            proxy = None if name == "direct" else ProxyProcess(upstream_port, cpus[0] if cpus else None,
                                                                (*UNLIMITED, *flags, *proxy_args), env=env)
            try:
                results = new_results()
                until = time.monotonic() + LIMITS_SECONDS
                await asyncio.gather(*(keep_alive_client(proxy.port if proxy else upstream_port,
                                                         route if proxy else direct_route, results, until)
                                       for _ in range(clients)))
                row[f"{name}_p50_ms"] = ms(percentile(results["latency"], 50))
                row[f"{name}_p99_ms"] = ms(percentile(results["latency"], 99))
                row[f"{name}_requests"] = len(results["latency"])
                row["errors"] = row.get("errors", 0) + len(results["errors"])
                row["sample_error"] = row.get("sample_error") or (results["errors"] or [None])[0]
                if redis_port:
                    trips = metric(proxy.port, "proxy_redis_round_trips_total")
                    row[f"{name}_trips_per_request"] = round(trips / max(1, len(results["latency"])), 2)
                    row[f"{name}_unshared"] = metric(proxy.port, r'proxy_limits_unshared_total\{outcome="served"\}')
            finally:
                if proxy is not None:
                    proxy.stop()
        return row
    finally:
        relay.close()
        redis.stop()
        upstream.close()


async def scenario(name, route, cpus, proxy_args=(), shape=None, system="proxy.py"):
    """One scenario on one route: direct, then through the proxy (or the system named)."""
    if name == "burst":
        return [await burst(route, cpus, proxy_args, system, clients) for clients in BURST_CLIENTS]
    if name == "realtime":
        return [await realtime(cpus, proxy_args, system)]
    ProxyProcess.home = SYSTEMS[system][0]
    if name == "overload":
        return await overload(route, cpus, proxy_args, shape or OVERLOAD)
    if name == "quiet":
        return await quiet(route, cpus, proxy_args)
    if name == "workers":
        return await workers(route, cpus, proxy_args)
    if name == "keepalive":
        return await keepalive(route, cpus, (*UNLIMITED, *proxy_args))
    if name == "rtt":
        return await rtt(route, cpus, proxy_args)
    if name == "limits":
        return await limits(route, cpus, proxy_args)
    streams, chunks, gap, think = SCENARIOS[name]
    upstream = Upstream()
    upstream.chunks, upstream.gap, upstream.think = chunks, gap, think
    upstream_port = await upstream.start()
    leave_after = ABORT_AFTER if name == "abort" else None
    direct_route = route if route != "/message" else "/v1/chat/completions"
    # Streams start at random points within one gap, as real ones do: all of them in step
    # would make every chunk of a round arrive at the same instant.
    random.seed(streams)
    direct = await run_clients(upstream_port, direct_route, streams, leave_after, gap)
    upstream.phase = "proxy"
    proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None, (*UNLIMITED, *proxy_args))
    try:
        await run_clients(proxy.port, route, 1)  # warm: every thread the proxy keeps is running
        baseline = (proxy.status("Threads"), proxy.sockets())
        cpu_before = proxy.cpu_seconds()
        random.seed(streams)
        via = await run_clients(proxy.port, route, streams, leave_after, gap)
        left_at = time.monotonic()  # every client has left (abort) or finished
        cpu = proxy.cpu_seconds() - cpu_before
        row = {"scenario": name, "route": route, "streams": streams, "chunks": via["chunks"],
               "errors": sum(len(r["errors"]) + len(r["refused"]) for r in (via, direct)),
               "ttfb_ms": round(statistics.median(via["ttfb"]) * 1000, 2) if via["ttfb"] else None,
               "p50_ms": round(percentile(via["delays"], 50) * 1000, 3),
               "p99_ms": round(percentile(via["delays"], 99) * 1000, 3),
               "added_p50_ms": round((percentile(via["delays"], 50) - percentile(direct["delays"], 50)) * 1000, 3),
               "added_p99_ms": round((percentile(via["delays"], 99) - percentile(direct["delays"], 99)) * 1000, 3),
               "added_p99_after_first_ms": round((percentile(via["steady"], 99)
                                                  - percentile(direct["steady"], 99)) * 1000, 3),
               "cpu_us_per_chunk": round(cpu / max(1, len(via["delays"])) * 1e6, 1),
               "chunks_per_s": round(len(via["delays"]) / via["seconds"]),
               "direct_chunks_per_s": round(len(direct["delays"]) / direct["seconds"]),
               "peak_rss_mb": round(proxy.status("VmHWM") / 1024, 1)}
        if name == "abort":
            await asyncio.sleep(1.0)  # the proxy has one second to close every upstream stream
            closed = [t for phase, t in upstream.closed_early if phase == "proxy" and t - left_at <= 1.0]
            row["upstreams_closed"] = f"{len(closed)}/{streams}"
            row["threads_sockets"] = f"{baseline} -> {(proxy.status('Threads'), proxy.sockets())}"
        row["sample_error"] = (via["errors"] or direct["errors"] or via["refused"] or [None])[0]
        return row
    finally:
        proxy.stop()
        upstream.close()


# --------------------------------------------------------------------------
# realtime: WebSocket sessions, as the Realtime API's
# --------------------------------------------------------------------------

# realtime: REALTIME_SESSIONS sessions at once, each with REALTIME_EVENTS events each way REALTIME_GAP s apart
# (audio deltas every 20 ms, base64 of about 2.3 KB as 24 kHz PCM16 for 50 ms is), every event stamped with
# its send time: the delay each way, and the CPU per event relayed.
REALTIME_SESSIONS, REALTIME_EVENTS, REALTIME_GAP = 200, 100, 0.02
REALTIME_AUDIO = "QUFB" * 800  # 3,200 characters of base64
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode, payload, masked):
    """One whole WebSocket frame (RFC 6455, 5.2); masked with a zero key, which leaves the payload as it is."""
    count = len(payload)
    bit = 0x80 if masked else 0
    if count < 126:
        head = bytes([0x80 | opcode, bit | count])
    elif count < 65536:
        head = bytes([0x80 | opcode, bit | 126]) + count.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, bit | 127]) + count.to_bytes(8, "big")
    return head + (bytes(4) if masked else b"") + payload


async def ws_read(reader):
    """(opcode, payload) of the next frame; the payload unmasked (the bench's own frames use a zero key)."""
    head = await reader.readexactly(2)
    count = head[1] & 0x7F
    if count == 126:
        count = int.from_bytes(await reader.readexactly(2), "big")
    elif count == 127:
        count = int.from_bytes(await reader.readexactly(8), "big")
    key = await reader.readexactly(4) if head[1] & 0x80 else None
    payload = await reader.readexactly(count)
    if key and key != bytes(4):
        payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return head[0] & 0x0F, payload


def stamped_event(kind):
    return json.dumps({"type": kind, "stamp": time.monotonic(), "delta": REALTIME_AUDIO}).encode()


async def ws_session(reader, writer, masked, kind, results, side):
    """Send REALTIME_EVENTS stamped events REALTIME_GAP apart while reading the other side's, noting each
    one's delay; then a close, answered."""
    async def send():
        await asyncio.sleep(random.uniform(0, REALTIME_GAP))
        for _ in range(REALTIME_EVENTS):
            writer.write(ws_frame(0x1, stamped_event(kind), masked))
            await asyncio.sleep(REALTIME_GAP)

    sending = asyncio.ensure_future(send())
    got = 0
    try:
        while got < REALTIME_EVENTS:
            opcode, payload = await ws_read(reader)
            if opcode == 0x1:
                results[side].append(time.monotonic() - json.loads(payload)["stamp"])
                got += 1
        await sending
        if side == "down":  # the client ends the session, as an SDK's close() does
            writer.write(ws_frame(0x8, (1000).to_bytes(2, "big"), masked))
        opcode, payload = await ws_read(reader)
        if side == "up":
            writer.write(ws_frame(0x8, payload, masked))
    finally:
        sending.cancel()


class RealtimeUpstream:
    """A Realtime-like WebSocket server: it answers the handshake, then streams stamped events."""

    def __init__(self, results):
        self.results = results

    async def start(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, backlog=4096)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            key = re.search(r"(?i)^sec-websocket-key:\s*(\S+)", head, re.M).group(1)
            accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept)
            await ws_session(reader, writer, False, "response.output_audio.delta", self.results, "up")
        except (OSError, asyncio.IncompleteReadError, AttributeError) as error:
            self.results["errors"].append(f"upstream: {error!r}")
        finally:
            writer.close()

    def close(self):
        self.server.close()


async def realtime_client(port, results):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        results["errors"].append(repr(error))
        return
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer client-key\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if " 101 " not in head.split("\r\n")[0]:
            results["errors"].append(head.split("\r\n")[0])
            return
        await ws_session(reader, writer, True, "input_audio_buffer.append", results, "down")
    except (OSError, asyncio.IncompleteReadError) as error:
        results["errors"].append(repr(error))
    finally:
        writer.close()


async def run_realtime(port, results):
    started = time.monotonic()
    await asyncio.gather(*(realtime_client(port, results) for _ in range(REALTIME_SESSIONS)))
    return time.monotonic() - started


async def realtime(cpus, proxy_args, system):
    """Sessions relayed both ways at audio pace: the delay each way and the CPU per event, against direct."""
    direct = {"up": [], "down": [], "errors": []}
    upstream = RealtimeUpstream(direct)
    upstream_port = await upstream.start()
    random.seed(REALTIME_SESSIONS)
    await run_realtime(upstream_port, direct)
    via = {"up": [], "down": [], "errors": []}
    upstream.results = via
    target = start_system(system, upstream_port, cpus, proxy_args)
    try:
        warm = {"up": [], "down": [], "errors": []}
        upstream.results = warm
        await realtime_client(target.port, warm)
        upstream.results = via
        cpu_before = target.cpu_seconds()
        random.seed(REALTIME_SESSIONS)
        seconds = await run_realtime(target.port, via)
        cpu = target.cpu_seconds() - cpu_before
        events = len(via["up"]) + len(via["down"])
        return {"scenario": "realtime", "route": "/v1/realtime", "system": system, "sessions": REALTIME_SESSIONS,
                "events": events, "errors": len(via["errors"]) + len(direct["errors"]),
                "events_per_s": round(events / seconds),
                "cpu_us_per_event": round(cpu / max(1, events) * 1e6, 1),
                "up_added_p50_ms": ms(percentile(via["up"], 50) - percentile(direct["up"], 50)),
                "up_added_p99_ms": ms(percentile(via["up"], 99) - percentile(direct["up"], 99)),
                "down_added_p50_ms": ms(percentile(via["down"], 50) - percentile(direct["down"], 50)),
                "down_added_p99_ms": ms(percentile(via["down"], 99) - percentile(direct["down"], 99)),
                "peak_rss_mb": round(target.status("VmHWM") / 1024, 1),
                "sample_error": (via["errors"] or direct["errors"] or [None])[0]}
    finally:
        target.stop()
        upstream.close()


TABLES = (
    ("per token", ("scenario", "route", "system", "streams", "chunks", "errors", "ttfb_ms", "added_p50_ms", "added_p99_ms",
                   "added_p99_after_first_ms", "cpu_us_per_chunk", "chunks_per_s", "peak_rss_mb",
                   "upstreams_closed", "threads_sockets")),
    ("overload", ("route", "system", "streams", "served", "gap_p99_ms", "direct_gap_p99_ms", "gap_max_ms", "refused",
                  "with_retry_after", "refusal_p99_ms", "refusal_max_ms", "unanswered", "healthz_p50_ms",
                  "healthz_p99_ms", "healthz_max_ms", "healthz_failed", "active_max", "peak_rss_mb")),
    ("quiet", ("route", "system", "streams", "served", "errors", "cpu_s", "gap_p99_ms", "threads_max",
               "threads_running", "rss_max_mb",
               "peak_rss_mb", "healthz_p50_ms", "healthz_p99_ms", "healthz_max_ms", "healthz_failed", "running_probes",
               "running_healthz_p99_ms", "running_healthz_max_ms", "running_slowest_at_s")),
    ("workers", ("route", "layout", "system", "chunks_per_s", "chunks_per_s_range", "cpu_us_per_chunk",
                 "cpu_us_per_chunk_range", "requests_per_s", "requests_per_s_range", "cpu_us_per_request",
                 "cpu_us_per_request_range", "store_cpu_us_per_request", "errors")),
    ("keepalive", ("route", "system", "clients", "requests", "direct_requests", "errors", "p50_ms", "p99_ms", "max_ms",
                   "direct_p50_ms", "direct_max_ms")),
    ("flood", ("system", "flood", "attackers", "seconds", "probes", "served", "told_503", "no_answer", "other",
               "probe_p99_ms", "log_lines", "peak_rss_mb")),
    ("siege", ("system", "slow", "wrk", "seconds", "probes", "served", "told_503", "no_answer", "other", "probe_p50_ms",
               "probe_p99_ms", "probe_max_ms", "over_1s", "listen_drops", "wrk_requests_per_s")),
    ("rtt", ("route", "system", "rtt_ms", "sequential", "direct_p50_ms", "ttfb_p50_ms", "ttfb_p99_ms", "added_p50_ms",
             "direct_opened", "opened", "wave", "wave1_p50_ms", "wave2_p50_ms", "wave2_p99_ms", "wave1_opened",
             "wave2_opened", "errors")),
    ("requests", ("route", "system", "requests", "cpu_us_per_request", "cpu_us_range", "requests_per_s",
                  "direct_ttfb_p50_ms",
                  "ttfb_p50_ms", "added_ttfb_p50_ms", "added_ttfb_p99_ms")),
    ("burst", ("route", "system", "clients", "requests", "served", "errors", "chunks_per_s", "direct_chunks_per_s",
               "cpu_us_per_chunk", "added_p99_ms", "ttfb_p99_ms", "direct_ttfb_p99_ms", "peak_rss_mb")),
    ("realtime", ("system", "sessions", "events", "errors", "events_per_s", "cpu_us_per_event", "up_added_p50_ms",
                  "up_added_p99_ms", "down_added_p50_ms", "down_added_p99_ms", "peak_rss_mb")),
    ("limits", ("route", "clients", "redis_ping_ms", "redis_away_ping_ms", "direct_p50_ms", "none_p50_ms", "none_p99_ms", "process_p50_ms",
                "process_p99_ms", "redis_p50_ms", "redis_p99_ms", "redis_trips_per_request", "redis_away_p50_ms",
                "redis_away_p99_ms", "redis_away_trips_per_request", "redis_away_unshared", "errors")),
)


def print_table(rows):
    """One table for the per-token scenarios, one for each other scenario."""
    own_tables = {title for title, _ in TABLES}
    for title, columns in TABLES:
        kind = [r for r in rows if (r["scenario"] if r["scenario"] in own_tables else "per token") == title]
        if not kind:
            continue
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in kind)) for c in columns}
        print(f"\n{title}")
        print("  ".join(c.ljust(widths[c]) for c in columns))
        for row in kind:
            print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def startup_ms():
    """How soon `python3 proxy.py` answers /healthz after it is started."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "proxy.py"), "--demo", "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = next(line for line in process.stderr if "listening on" in line)
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", line).group(1))
    elapsed = None
    while elapsed is None and time.monotonic() - started < 10:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                elapsed = (time.monotonic() - started) * 1000
        except OSError:
            time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    return None if elapsed is None else round(elapsed, 1)


def raise_open_file_limit():
    """Both ends of every connection live on this machine: take all the open files the hard limit allows."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def runs_of(name, route):
    """(system, route) pairs for one scenario, each system in turn per route so that they share the run's
    conditions: this checkout and the baseline everywhere; nginx, the limits and the routes rows only where
    the scenario has reference rows, nginx on /v1 only."""
    routes = [route] if route else (ROUTES[:1] if name in ("flood", "siege") else ROUTES[1:] if name == "realtime"
                                    else ROUTES)

    def runs(system, each):
        if name == "workers":  # its systems are this checkout's, WORKERS=1 and 2
            return system == "proxy.py"
        if system == "nginx":
            return name == "siege" or (name in REFERENCED and each != "/message")
        return system not in ("proxy.py+limits", "proxy.py+routes") or name in REFERENCED

    return [(system, each) for each in routes for system in (*SYSTEMS, "nginx") if runs(system, each)]


@contextlib.contextmanager
def baseline_worktree(rev):
    """A detached git worktree of `rev` beside this checkout's history, removed afterwards; None without one."""
    if not rev:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="bench-baseline-")
    subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", folder, rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", folder], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(folder, ignore_errors=True)


def main():
    if sys.argv[1:2] in (["--probe"], ["--probe-message"]):
        (probe if sys.argv[1] == "--probe" else probe_message)(int(sys.argv[2]), float(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description="Measure proxy.py against the direct path.")
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of {', '.join(SCENARIOS)}; default: all")
    parser.add_argument("--route", choices=ROUTES, help="default: both")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--overload-streams", type=int, default=OVERLOAD[0],
                        help=f"streams the overload scenario starts (default {OVERLOAD[0]})")
    parser.add_argument("--overload-rate", type=float, default=1 / OVERLOAD[2],
                        help=f"chunks a second in each of its streams (default {1 / OVERLOAD[2]:g}); "
                             "with the streams, a way to size MAX_STREAMS for a machine")
    parser.add_argument("--flood-seconds", type=float, default=FLOOD_SECONDS,
                        help=f"how long each flood runs (default {FLOOD_SECONDS:g})")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run proxy.py as of this git revision (a temporary worktree), interleaved")
    parser.add_argument("--with-routes", action="store_true",
                        help="also run this proxy.py with three upstream keys and two routes (OA_ROUTES), "
                             "in the scenarios with reference rows")
    parser.add_argument("--with-limits", action="store_true",
                        help="also run this proxy.py with per-client limits in the process (none refusing), "
                             "in the scenarios with reference rows")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="FLAG",
                        help="an extra flag for proxy.py, e.g. --proxy-arg=--max-streams=0 (repeatable)")
    args = parser.parse_args()
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        os.sched_setaffinity(0, set(cpus[1:]))  # the proxy gets cpus[0] to itself
        note = f"proxy pinned to CPU {cpus[0]}, upstream and clients to CPU {','.join(map(str, cpus[1:]))}"
    else:
        cpus, note = [], "one CPU: the proxy, the upstream and the clients share it"
    rows = []
    raise_open_file_limit()
    seconds = OVERLOAD[1] * OVERLOAD[2]  # each stream lasts as long at any rate
    shape = (args.overload_streams, round(seconds * args.overload_rate), 1 / args.overload_rate, 0.0)
    with baseline_worktree(args.baseline) as baseline:
        if baseline:
            SYSTEMS[f"proxy.py@{args.baseline}"] = (baseline, ())
        if args.with_routes:
            SYSTEMS["proxy.py+routes"] = (HERE, ROUTE_FLAGS)
        if args.with_limits:
            SYSTEMS["proxy.py+limits"] = (HERE, LIMIT_FLAGS)
        for name in args.scenarios or list(SCENARIOS):
            pairs = runs_of(name, args.route)
            if name == "requests":  # the systems side by side, in turns: one run a route
                routes = list(dict.fromkeys(route for _, route in pairs))
                pairs = [(tuple(system for system, each in pairs if each == route), route) for route in routes]
            for system, route in pairs:
                if name == "requests":
                    new_rows = asyncio.run(requests(route, cpus, args.proxy_arg, system))
                elif name == "flood":  # one route: the floods are about connections, not relaying
                    ProxyProcess.home = SYSTEMS[system][0]
                    new_rows = asyncio.run(flood(cpus, args.proxy_arg, args.flood_seconds))
                elif name == "siege":
                    new_rows = [asyncio.run(siege(cpus, args.proxy_arg, system, args.flood_seconds))]
                else:
                    found = asyncio.run(scenario(name, route, cpus, args.proxy_arg, shape, system))
                    new_rows = found if isinstance(found, list) else [found]
                for row in new_rows:
                    row.setdefault("system", system)
                    rows.append(row)
                    if args.json:
                        print(json.dumps(row), flush=True)
    start = startup_ms()
    if args.json:
        print(json.dumps({"startup_ms": start, "pinning": note}))
    else:
        print(note)
        print_table(rows)
        print(f"start-up: /healthz answers {start} ms after `python3 proxy.py` starts")


if __name__ == "__main__":
    main()
