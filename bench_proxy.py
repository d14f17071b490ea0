#!/usr/bin/env python3
"""bench_proxy.py: what proxy.py costs per token, measured against the direct path.

Run:  python bench_proxy.py                 (every scenario, both routes)
      python bench_proxy.py latency abort   (some of them)
      python bench_proxy.py --json          (for machines)

One asyncio loop plays the upstream (chat.completion.chunk events, HTTP/1.1
chunked, each chunk stamped with its send time) and every client. proxy.py
runs as a subprocess. Each scenario runs straight against the upstream and
then through the proxy, in the same run, so every figure is also a ratio to
the direct path. Where the machine allows, every thread of the proxy is
pinned to one CPU and this process to another. Streams start at random
points within one gap between chunks, as independent clients do. The
proxy's CPU time comes from its process_cpu_seconds_total metric. Standard
library only.
"""

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (streams, chunks per stream, gap between chunks in s, seconds before the first chunk)
SCENARIOS = {
    "latency": (50, 100, 0.02, 0.0),
    "concurrency": (500, 50, 0.1, 0.0),
    "throughput": (20, 2000, 0.0, 0.0),
    "thinking": (2000, 5, 0.1, 30.0),
    "abort": (100, 1000, 0.02, 0.0),  # the clients leave after 10 chunks
}
ABORT_AFTER = 10
ROUTES = ("/message", "/v1/chat/completions")


# --------------------------------------------------------------------------
# The upstream
# --------------------------------------------------------------------------

class Upstream:
    """An OpenAI-like streaming server: a script per request, and a count of streams cut short."""

    def __init__(self):
        self.chunks, self.gap, self.think = 0, 0.0, 0.0
        self.phase = "direct"   # which run a request belongs to
        self.closed_early = []  # (phase, monotonic time) of each stream whose reader went away

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
            reader, writer = await asyncio.open_connection(sock=connection)
            task = asyncio.ensure_future(self.serve(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def close(self):
        self.accepting.cancel()
        self.listener.close()

    async def serve(self, reader, writer):
        phase = self.phase
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
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
                    b'"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                    b"data: [DONE]\n\n")
            writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_early.append((phase, time.monotonic()))
        finally:
            writer.close()


# --------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------

STAMP = re.compile(rb"(\d{10}\.\d+) ")


async def stream(port, route, results, leave_after=None, stagger=0.0):
    """One client: post, read the chunked stream, note each chunk's delay from its stamp."""
    await asyncio.sleep(random.uniform(0, stagger))
    started = time.time()
    body = (json.dumps({"messages": [{"role": "user", "content": "bench"}]}) if route == "/message"
            else json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "b"}],
                             "stream_options": {"include_usage": True}})).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST %b HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (route.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        results["ttfb"].append(time.time() - started)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise ValueError(head.split(b"\r\n", 1)[0].decode())
        seen = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            now = time.time()
            for stamp in STAMP.findall(data):
                results["delays"].append(now - float(stamp))
                if seen:  # a stream's first chunk also carries the proxy's per-request setup
                    results["steady"].append(now - float(stamp))
                seen += 1
            if leave_after and seen >= leave_after:
                writer.transport.abort()  # the client goes away mid-stream
                results["chunks"] += seen
                return
        results["chunks"] += seen
        writer.close()
    except (OSError, ValueError, asyncio.IncompleteReadError) as error:
        results["errors"].append(repr(error))


async def run_clients(port, route, streams, leave_after=None, stagger=0.0):
    results = {"ttfb": [], "delays": [], "steady": [], "chunks": 0, "errors": []}
    started = time.monotonic()
    await asyncio.gather(*(stream(port, route, results, leave_after, stagger) for _ in range(streams)))
    results["seconds"] = time.monotonic() - started
    return results


# --------------------------------------------------------------------------
# The proxy process
# --------------------------------------------------------------------------

class ProxyProcess:
    """proxy.py in a subprocess, pinned to a CPU, read through /proc and its /metrics."""

    def __init__(self, upstream_port, cpu):
        # The access log goes to a file, as in a deployment: a closed pipe would make each line fail fast.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "proxy.py"), "--port", "0", "--api-key", "bench",
             "--base-url", f"http://127.0.0.1:{upstream_port}/v1", "--max-connections", "10000",
             "--max-streams", "0"],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 30
        found = None
        while found is None and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.01)
            self.log.seek(0)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read())
        if found is None:
            self.process.kill()
            raise RuntimeError("proxy.py did not start listening within 30 s")
        self.port = int(found.group(1))
        if cpu is not None:
            # Every thread, not just the main one: a thread started later inherits
            # its creator's CPUs, and the proxy's workers are started by its pool thread.
            for thread in os.listdir(f"/proc/{self.process.pid}/task"):
                os.sched_setaffinity(int(thread), {cpu})

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


# --------------------------------------------------------------------------
# Scenarios and the report
# --------------------------------------------------------------------------

def percentile(values, share):
    return statistics.quantiles(values, n=100)[share - 1] if len(values) >= 2 else (values or [0])[0]


async def scenario(name, route, cpus):
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
    proxy = ProxyProcess(upstream_port, cpus[0] if cpus else None)
    try:
        await run_clients(proxy.port, route, 1)  # warm: every thread the proxy keeps is running
        baseline = (proxy.status("Threads"), proxy.sockets())
        cpu_before = proxy.cpu_seconds()
        random.seed(streams)
        via = await run_clients(proxy.port, route, streams, leave_after, gap)
        left_at = time.monotonic()  # every client has left (abort) or finished
        cpu = proxy.cpu_seconds() - cpu_before
        row = {"scenario": name, "route": route, "streams": streams, "chunks": via["chunks"],
               "errors": len(via["errors"]) + len(direct["errors"]),
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
        row["sample_error"] = (via["errors"] or direct["errors"] or [None])[0]
        return row
    finally:
        proxy.stop()
        upstream.close()


def print_table(rows):
    columns = ("scenario", "route", "streams", "chunks", "errors", "ttfb_ms", "added_p50_ms", "added_p99_ms",
               "added_p99_after_first_ms",
               "cpu_us_per_chunk", "chunks_per_s", "peak_rss_mb", "upstreams_closed", "threads_sockets")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def startup_ms():
    """How soon `python proxy.py` answers /healthz after it is started."""
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


def main():
    parser = argparse.ArgumentParser(description="Measure proxy.py against the direct path.")
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of {', '.join(SCENARIOS)}; default: all")
    parser.add_argument("--route", choices=ROUTES, help="default: both")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
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
    for name in args.scenarios or list(SCENARIOS):
        for route in ([args.route] if args.route else ROUTES):
            rows.append(asyncio.run(scenario(name, route, cpus)))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    start = startup_ms()
    if args.json:
        print(json.dumps({"startup_ms": start, "pinning": note}))
    else:
        print(note)
        print_table(rows)
        print(f"start-up: /healthz answers {start} ms after `python proxy.py` starts")


if __name__ == "__main__":
    main()
