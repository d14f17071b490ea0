"""Tests for proxy.py: real loopback sockets, a scriptable fake upstream, no mocks.

Run: python3 -m unittest -v test_proxy
"""

import ast
import asyncio
import base64
import concurrent.futures
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import http.client
import http.server
import io
import json
import math
import logging
import os
import pathlib
import queue
import random
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import string
import struct
import subprocess
import tempfile
import sys
import threading
import time
import unittest

import proxy

try:  # test-only: .ci/run installs it; the core tests need nothing
    import openai
except ImportError:
    openai = None
try:  # test-only: openai-python's realtime extra needs it (client.realtime.connect)
    import websockets
except ImportError:
    websockets = None
try:  # test-only: drives Debian's chromium for the UI tests
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
try:  # test-only: the Prometheus text parser checks GET /metrics
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    text_string_to_metric_families = None
try:  # test-only: radon measures proxy.py's cyclomatic complexity
    from radon.complexity import cc_visit
except ImportError:
    cc_visit = None

HERE = os.path.dirname(os.path.abspath(__file__))

# The proxy's log goes nowhere unless a test asserts on it (assertLogs): a passing run prints nothing of it.
logging.getLogger("proxy").addHandler(logging.NullHandler())
logging.getLogger("proxy").propagate = False
TEST_KEY = "sk-test-0123456789abcdef"
CREATED = 1700000000

# A self-signed certificate for 127.0.0.1, valid until 2126, so that the TLS
# upstream test needs no tool to make one. Test material only.
TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBkDCCATagAwIBAgIUQwf+AXV4GOrLF9t3toUBouhbPFswCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyNDIyNDM1NVoYDzIxMjYxMDMx
MjI0MzU1WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQyDXi30cxZcu9owfyB/qJU1/+Wj0ss6r+vOkGJOK03ZH3JWCz5ES7i
jCd177CQy/4nNiAWdXcPsv9q58nZL+ezo2QwYjAdBgNVHQ4EFgQU/BiMr7t+jcaM
o8wqEDwbtgBwAzIwHwYDVR0jBBgwFoAU/BiMr7t+jcaMo8wqEDwbtgBwAzIwDwYD
VR0RBAgwBocEfwAAATAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUC
IQDWJ8FvduoguVlOjsnpPTvp0wTXMDJKHRqw0XywxCmnPAIgCDWlH5DZw12Q967y
5MzC4RV0jjPZ1B2lUTFCKCZlII8=
-----END CERTIFICATE-----
"""
TEST_CERT_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgWSynPKrXzIghwcsc
TPli3PIXArJJxoByHSmNjorkYKqhRANCAAQyDXi30cxZcu9owfyB/qJU1/+Wj0ss
6r+vOkGJOK03ZH3JWCz5ES7ijCd177CQy/4nNiAWdXcPsv9q58nZL+ez
-----END PRIVATE KEY-----
"""


# --------------------------------------------------------------------------
# The fake upstream
# --------------------------------------------------------------------------

HANG = "hang"    # step: send nothing more and wait for the proxy to hang up
ABORT = "abort"  # step: close the connection without ending the chunked body


@dataclasses.dataclass
class Script:
    """What the fake upstream does with one request.

    steps: bytes are sent as one HTTP chunk each; a threading.Event is waited
    for; a float is slept (upstream timing, not test synchronisation); HANG
    and ABORT end the response early. Without HANG or ABORT the chunked body
    ends normally. body, when set, is sent whole with a Content-Length.
    """

    steps: list = dataclasses.field(default_factory=list)
    status: int = 200
    headers: dict = dataclasses.field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    body: bytes = None
    hold_headers: bool = False  # answer nothing; wait for the proxy to hang up
    hang_up: bool = False       # close the connection at once, answering nothing (a reset)
    close_after: bool = False   # close the connection after the response, without saying so first


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: http.client.HTTPMessage
    body: bytes
    port: int = 0  # the proxy's end of the connection it came on

    def json(self):
        return json.loads(self.body)


def sse(payload) -> bytes:
    """An upstream SSE event as OpenAI writes it."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(content=None, role=None, finish=None, created=CREATED) -> bytes:
    """A chat.completion.chunk event."""
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def usage_chunk(prompt=3, completion=2) -> bytes:
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED,
                "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}})


DONE = b"data: [DONE]\n\n"


def reply(*words, usage=True) -> list:
    """Steps for a complete, well-formed streamed reply."""
    steps = [chunk(role="assistant", content="")] + [chunk(content=w) for w in words]
    steps.append(chunk(finish="stop"))
    if usage:
        steps.append(usage_chunk())
    return steps + [DONE]


class _FakeUpstreamServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a proxy may reset a kept-alive connection
            super().handle_error(request, client_address)

    def shutdown_request(self, request):
        try:
            port = request.getpeername()[1]
        except OSError:
            port = None
        super().shutdown_request(request)
        with self.fake.lock:  # once closed: the proxy can see the end now
            self.fake.closed.append(port)


class _FakeUpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY, as servers set it (Go's net/http does by default)

    def setup(self):
        super().setup()
        fake = self.server.fake
        with fake.lock:
            fake.connections.append(self.client_address[1])
            if isinstance(self.connection, ssl.SSLSocket):
                fake.tls_resumed.append(self.connection.session_reused)


    def do_POST(self):
        fake = self.server.fake
        fake.heads.append(self.path)  # before the body, which a proxy may still be streaming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        received = Received(self.command, self.path, self.headers, body, self.client_address[1])
        with fake.lock:
            fake.requests.append(received)
        script = fake.script(received) if callable(fake.script) else fake.script
        if fake.model_list is not None and self.command == "GET" and self.path.endswith("/models"):
            script = json_script({"object": "list", "data": [{"id": name} for name in fake.model_list]})
        try:
            self.play(script)
        except (BrokenPipeError, ConnectionResetError):
            fake.disconnected.set()
            self.close_connection = True

    do_GET = do_DELETE = do_POST

    def play(self, script: Script):
        if script.hang_up:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if script.hold_headers:
            self.wait_for_hangup()
            return
        self.send_response(script.status)
        for name, value in script.headers.items():
            self.send_header(name, value)
        if script.body is not None:
            self.send_header("Content-Length", str(len(script.body)))
            self.end_headers()
            self.wfile.write(script.body)
            self.close_connection = self.close_connection or script.close_after
            return
        sized = "Content-Length" in script.headers  # steps are then the raw body, in pieces
        if not sized:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for step in script.steps:
            if isinstance(step, bytes):
                self.server.fake.sent_at.append(time.monotonic())  # before: the relay may beat the append
                self.wfile.write(step if sized else b"%x\r\n%b\r\n" % (len(step), step))
            elif isinstance(step, threading.Event):
                step.wait(10)
            elif isinstance(step, float):
                time.sleep(step)
            elif step == HANG:
                self.wait_for_hangup()
                return
            elif step == ABORT:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
        if not sized:
            self.wfile.write(b"0\r\n\r\n")
        if script.close_after:
            self.close_connection = True

    def wait_for_hangup(self, limit=30.0):
        """Block until the proxy closes this connection (bounded), and record it."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    data = self.connection.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.server.fake.disconnected.set()
                    break
        self.close_connection = True

    def log_message(self, format, *args):
        pass


class FakeUpstream:
    """A scriptable OpenAI-like server on a loopback port, recording what it received."""

    def __init__(self, tls_files=None):
        self.script = Script(steps=reply("Hello", " world"))
        self.model_list = None  # set: GET .../models answers these ids, whatever the script
        self.requests = []
        self.heads = []  # the paths of requests whose head has arrived, body or not
        self.connections = []  # the proxy's port of each connection accepted
        self.closed = []       # ... and of each that ended
        self.tls_resumed = []  # for TLS: whether each connection resumed a session
        self.sent_at = []
        self.lock = threading.Lock()
        self.disconnected = threading.Event()
        self.server = _FakeUpstreamServer(("127.0.0.1", 0), _FakeUpstreamHandler)
        self.server.fake = self
        self.scheme = "http"
        if tls_files:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_files)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    @property
    def base_url(self):
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# A second fake upstream, speaking raw bytes: what a well-behaved server cannot send.
# Secrets that look like no key pattern, so that only masking by value can catch them.
ECHO_UPSTREAM_KEY = "Zq7vX2mP9wK4rT8yL3nB6cD1"
ECHO_CLIENT_KEY = "Hj5kM8pQ2sV6xZ9aC4eG7iL0"
ECHO_METRICS_TOKEN = "Wn3bR7tY1uO5pA9sD2fG6hJ4"
ECHO_SECRETS = (ECHO_UPSTREAM_KEY, ECHO_CLIENT_KEY, ECHO_METRICS_TOKEN)


def escaped(text: str, every: bool = True) -> str:
    """text as JSON may write it: each character as a \\u escape, or only the first."""
    return "".join("\\u%04x" % ord(char) for char in text) if every else "\\u%04x" % ord(text[0]) + text[1:]


def meaning_echoes(key: str, client: str, token: str) -> dict:
    """Upstream answers that hide the secrets where only meaning, not bytes, finds them: every field of an
    error, JSON escapes, duplicate fields, splits by any character, fragments; in bodies and in event
    streams framed chunked, by Content-Length and by the close of the connection."""
    def answer(status_line, content_type, body, framing="length"):
        if framing == "chunked":
            pieces = [body[i:i + 40] for i in range(0, len(body), 40)]
            framed = b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
            head = "Transfer-Encoding: chunked"
        elif framing == "close":
            framed, head = body, "Connection: close"
        else:
            framed, head = body, f"Content-Length: {len(body)}"
        return f"{status_line}\r\nContent-Type: {content_type}\r\n{head}\r\n\r\n".encode() + framed

    every_field = {"message": f"bad {key}", "type": key, "code": client, "param": token,
                   "detail": {"nested": [f"x {key}", {key: token}]}}
    escaped_error = ('{"error": {"message": "bad %s", "type": "%s", "code": "%s", "param": "%s"}}'
                     % (escaped(key), escaped(key, False), escaped(client), escaped(token, False))).encode()
    split = (f"{key[:10]}|{key[10:]} {client[:12]}\u200b{client[12:]} {token[:8]}-{token[8:16]}-{token[16:]} "
             f"{key[2:22]} {client.upper()}")
    answers = {
        "error-fields": ("HTTP/1.1 400 Bad Request", "application/json", json.dumps({"error": every_field}).encode()),
        "error-escaped": ("HTTP/1.1 429 Too Many Requests", "application/json", escaped_error),
        "error-duplicate": ("HTTP/1.1 400 Bad Request", "application/json",
                            ('{"error": {"message": "%s", "message": "fine", "type": "%s", "type": "x"}}'
                             % (key, client)).encode()),
        "error-split": ("HTTP/1.1 400 Bad Request", "application/json",
                        json.dumps({"error": {"message": split, "type": split}}).encode()),
        "error-text-escaped": ("HTTP/1.1 500 Internal Server Error", "text/plain",
                               f"boom {escaped(key)} {escaped(client, False)}".encode()),
    }
    start = chunk("Hi", role="assistant")
    events = {
        "fields": sse({"error": every_field}),
        "escaped": escaped_error.replace(b"\\u0065rror", b"error").join((b"data: ", b"\n\n")),
        "escaped-name": ('data: {"\\u0065rror": {"message": "%s"}}\n\n' % escaped(key)).encode(),
        "named": b"event: error\ndata: " + json.dumps({"type": "error", "message": key, "code": client}).encode()
                 + b"\n\n",
        "text": f": {token}\n\ndata: not json {key}\n\n".encode(),
        "cut": f'data: {{"error": {{"message": "{key}"'.encode(),
    }
    for name, event in events.items():
        for framing in ("chunked", "length", "close"):
            answers[f"stream-{name}-{framing}"] = ("HTTP/1.1 200 OK", "text/event-stream", start + event, framing)
    return {mode: functools.partial(answer, *args) for mode, args in answers.items()}


def echo_answer(mode: str) -> bytes:
    """A raw upstream answer that quotes the secrets in one place; see KeyEchoTest."""
    key, client, token = ECHO_SECRETS
    every = f"{key} {client} {token}"

    def answer(status_line, content_type, body, *fields):
        head = [status_line, f"Content-Type: {content_type}", f"Content-Length: {len(body)}", *fields]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    json_error = json.dumps({"error": {"message": every}}).encode()
    return {
        "reason": lambda: answer(f"HTTP/1.1 400 {every}", "application/json", json_error),
        "headers": lambda: answer("HTTP/1.1 200 OK", "application/json", b"{}", f"X-Request-Id: {key}",
                                  f"X-Echo: {every}", f"Openai-Organization: {key.lower()}"),
        "problem": lambda: answer("HTTP/1.1 400 Bad Request", "application/problem+json",
                                  json.dumps({"detail": every}).encode()),
        "octet": lambda: answer("HTTP/1.1 400 Bad Request", "application/octet-stream",
                                b"\x00\xff" + every.encode() + b"\x00"),
        "big": lambda: answer("HTTP/1.1 400 Bad Request", "text/plain", b"x" * 100000 + every.encode()),
        "big-chunked": lambda: (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n"
                                + b"".join(b"%x\r\n%b\r\n" % (len(piece), piece)
                                           for piece in (b"x" * 50000, b"x" * 50000, every.encode()))
                                + b"0\r\n\r\n"),
        "split-json": lambda: answer("HTTP/1.1 400 Bad Request", "application/json", json.dumps(
            {"error": {"message": f"{key[:9]}\n{key[9:]} {client[:12]} {client[12:]} {token[:3]}\t{token[3:]}",
                       "param": key, "code": client}}).encode()),
        "split-text": lambda: answer("HTTP/1.1 500 Internal Server Error", "text/plain",
                                     f"{key[:12]}\n  {key[12:]} {client.upper()} {token[:20]}\r\n{token[20:]}".encode()),
        "bad-status": lambda: f"HTTP/1.1 {every}\r\n\r\n".encode(),
        **meaning_echoes(key, client, token),
        "stream-output": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                                  + chunk(key, role="assistant") + chunk(finish="stop") + b"data: [DONE]\n\n"),
        "stream-error": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                                 b'data: {"error": {"message": "%b"}}\n\n' % every.encode()),
        "early-hints": lambda: (b"HTTP/1.1 100 Continue\r\n\r\n"
                                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                                b"HTTP/1.1 102 Processing\r\n\r\n"
                                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                                + chunk("Hi", role="assistant") + chunk(finish="stop") + b"data: [DONE]\n\n"),
        "endless-hints": lambda: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 40,
        "switching": lambda: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        # Heads a strict parser refuses, and one it reads as RFC 9112 allows.
        "folded-field": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Folded: one\r\n"
                                 b" \t two\r\nContent-Length: 2\r\n\r\n{}"),
        "field-without-colon": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nnot a field\r\n"
                                        b"Content-Length: 2\r\n\r\n{}"),
        "space-before-colon": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type : application/json\r\n"
                                       b"Content-Length: 2\r\n\r\n{}"),
        "two-lengths": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                                b"Content-Length: 7\r\n\r\n{}"),
        "cut-head": lambda: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
        "many-fields": lambda: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                + b"X-Many: 1\r\n" * 101 + b"Content-Length: 2\r\n\r\n{}"),
    }[mode]()


class _EchoHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline(65537)
            if not line:
                return
            head += line
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        self.rfile.read(int(length.group(1)) if length else 0)
        self.wfile.write(echo_answer(self.server.mode))


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# --------------------------------------------------------------------------
# Clients and helpers
# --------------------------------------------------------------------------

def make_config(**overrides):
    """A Config as the command line would build it, with test overrides.

    Retries and the breaker are off unless a test turns them on: the tests
    from before them expect one attempt per request.
    """
    config = proxy.load_config(["--api-key", TEST_KEY, "--port", "0"], {})
    return dataclasses.replace(config, **{"retries": 0, "breaker_threshold": 0, **overrides})


def chat_body(text="Hi", **fields):
    return json.dumps({"messages": [{"role": "user", "content": text}], **fields}).encode()


def parse_frames(text):
    """Split an SSE body into frames: ("comment", text) or (event, parsed JSON data)."""
    frames = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            frames.append(("comment", block[1:].strip()))
            continue
        fields = dict(line.split(":", 1) for line in block.split("\n"))
        frames.append((fields.get("event"), json.loads(fields["data"])))
    return frames


class _AnyTimestamp(int):
    """Equal to any whole number of seconds within a minute of now: a frame's timestamp."""

    def __eq__(self, other):
        return isinstance(other, int) and abs(other - time.time()) < 60

    __hash__ = int.__hash__


def seed_frame(content="", **fields):
    """What a done or error frame's data holds: the seed's timestamp and content, then its own fields."""
    return {"timestamp": _AnyTimestamp(0), "content": content, **fields}


class FrameReader:
    """Reads an SSE response frame by frame as the bytes arrive."""

    def __init__(self, response):
        self.response = response
        self.buffer = ""

    def next_frame(self):
        """The next raw frame text, or None at the end of the body."""
        while "\n\n" not in self.buffer:
            data = self.response.read1(65536)
            if not data:
                return None
            self.buffer += data.decode("utf-8")
        frame, self.buffer = self.buffer.split("\n\n", 1)
        return frame + "\n\n"

    def rest(self):
        return self.buffer + self.response.read().decode("utf-8")


def free_port():
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_count():
    """The threads of this process, as the kernel counts them: the proxy's workers are started with _thread,
    which threading.active_count() does not see."""
    try:
        return len(os.listdir("/proc/self/task"))
    except FileNotFoundError:  # not Linux: threading's count is the closest there is
        return threading.active_count()


def wait_until(predicate, limit=5.0):
    """Poll a condition that has no event to wait on (bounded)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def require(available, what):
    """Skip a test whose tool is missing, except in CI, where that is a failure."""
    if available:
        return
    if IN_CI:
        raise AssertionError(f"{what} is missing; .ci/run installs it")
    raise unittest.SkipTest(f"{what} is not available here; .ci/run installs it")


def json_completion(text="ok"):
    return json_script({"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED, "model": "m",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}]})


def v1_chat(stream, text="Hi"):
    return json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}).encode()


def json_script(payload, status=200, headers=None):
    body = json.dumps(payload).encode()
    return Script(status=status, headers={"Content-Type": "application/json", **(headers or {})}, body=body)


def in_turn(*scripts):
    """A fake upstream script that answers each request with the next script."""
    queue = list(scripts)
    return lambda received: queue.pop(0) if len(queue) > 1 else queue[0]


def read_until_closed(sock, limit=5.0):
    """Everything the proxy sends until it closes the connection (a timeout fails the test)."""
    sock.settimeout(limit)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d\d\d ")
SMUGGLED = b"GET /v1/models?smuggled=B HTTP/1.1\r\nHost: x\r\n\r\n"


def http_chunks(body: bytes) -> bytes:
    """A chunked body's content (RFC 9112, 7.1), for raw answers read off a socket."""
    content = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            return content
        content, body = content + body[:length], body[length + 2:]
    return content


def read_until_closed_or(sock, marker, limit=5.0):
    """What the proxy sends until `marker` has come or the connection closes (a timeout fails the test)."""
    sock.settimeout(limit)
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def start_stuck_client(test):
    """A client that asks for a stream (its body says "stuck") and never reads it, with a tiny receive buffer."""
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(5)
    stuck.connect(("127.0.0.1", test.port))
    test.addCleanup(stuck.close)
    body = chat_body("stuck")
    stuck.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


def reset(sock):
    """Close a socket with a TCP reset, as a crashed client or a middlebox would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef0"


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


class ProxyTestCase(unittest.TestCase):
    """Starts a fake upstream and a proxy on port 0 for each test."""

    config_overrides = {}
    server_class = proxy.ProxyServer

    def setUp(self):
        self.upstream = FakeUpstream().start()
        self.addCleanup(self.upstream.close)
        self.config = make_config(base_url=self.upstream.base_url, **self.config_overrides)
        self.server = self.server_class(self.config)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(self.stop_server)
        self.port = self.server.server_port

    def stop_server(self):
        self.server.shutdown()
        self.server.close()

    def connect(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, conn=None):
        conn = conn or self.connect()
        self.addCleanup(conn.close)
        conn.request(method, path, body=body, headers=headers or {})
        return conn.getresponse()

    def post_message(self, body=None, headers=None, conn=None):
        return self.request("POST", "/message", chat_body() if body is None else body, headers, conn)

    def assert_json_error(self, response, status, *message_parts):
        body = response.read()
        self.assertEqual(response.status, status, f"got {response.status} {body!r}; want {status}")
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        error = json.loads(body)["error"]
        for part in message_parts:
            self.assertIn(part, error["message"])
        self.assertIsInstance(error["type"], str)
        return error

    def raw_socket(self, timeout=5):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        self.addCleanup(sock.close)
        return sock

    def send_raw(self, data, shut_write=False):
        """Send raw request bytes; return the response, its head already read."""
        sock = self.raw_socket()
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response

    def contents(self, frames):
        return [data["content"] for event, data in frames if event == "message"]


class RawUpstreamTestCase(ProxyTestCase):
    """A proxy in front of an upstream that answers with raw bytes from echo_answer(mode)."""

    config_overrides = {"api_key": ECHO_UPSTREAM_KEY, "metrics_token": ECHO_METRICS_TOKEN,
                        "proxy_api_keys": (("alice", ECHO_CLIENT_KEY),)}

    def setUp(self):
        super().setUp()
        self.echo = _EchoServer(("127.0.0.1", 0), _EchoHandler)
        self.echo.mode = "headers"
        threading.Thread(target=self.echo.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(self.echo.server_close)
        self.addCleanup(self.echo.shutdown)
        self.server.config = dataclasses.replace(
            self.config, base_url=f"http://127.0.0.1:{self.echo.server_address[1]}/v1")

    def exchange(self, mode, method, path, body=b""):
        """The raw bytes the client gets for a request while the upstream answers in `mode`."""
        self.echo.mode = mode
        sock = self.raw_socket()
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
                     % (method.encode(), path.encode(), ECHO_CLIENT_KEY.encode(), len(body), body))
        return read_until_closed(sock)


# --------------------------------------------------------------------------
# Configuration and startup
# --------------------------------------------------------------------------

class ConfigTest(unittest.TestCase):
    def test_defaults(self):
        config = proxy.load_config([], {"OA_API_KEY": "k"})
        self.assertEqual(config.base_url, "https://api.openai.com/v1")
        self.assertEqual(config.model, "gpt-4o-mini")
        self.assertEqual((config.host, config.port), ("127.0.0.1", 8080))
        self.assertEqual(config.cors_origins, ("*",))
        self.assertEqual((config.connect_timeout, config.idle_timeout, config.heartbeat_interval,
                          config.drain_timeout), (10, 300, 15, 30))
        self.assertEqual(config.max_body_bytes, 1024 * 1024)
        self.assertEqual((config.retries, config.v1_retries, config.retry_max_wait), (2, 0, 20))
        self.assertEqual((config.breaker_threshold, config.breaker_cooldown), (5, 30))

    def test_flag_wins_over_environment(self):
        env = {"OA_API_KEY": "k", "OA_MODEL": "env-model", "PORT": "9000", "HOST": "::1"}
        config = proxy.load_config(["--model", "flag-model"], env)
        self.assertEqual(config.model, "flag-model")
        self.assertEqual((config.port, config.host), (9000, "::1"))

    def test_alternative_environment_names(self):
        config = proxy.load_config([], {"OPENAI_API_KEY": "k2", "OA_BASE_URL": "http://127.0.0.1:1/v1/"})
        self.assertEqual(config.api_key, "k2")
        self.assertEqual(config.base_url, "http://127.0.0.1:1/v1")
        config = proxy.load_config([], {"OA_API_KEY": "k1", "OPENAI_API_KEY": "k2",
                                        "OPENAI_BASE_URL": "http://a/v1", "OA_BASE_URL": "http://b/v1"})
        self.assertEqual((config.api_key, config.base_url), ("k1", "http://a/v1"))

    def test_cors_origins_list(self):
        config = proxy.load_config([], {"OA_API_KEY": "k", "CORS_ORIGINS": "https://a.example, https://b.example/"})
        self.assertEqual(config.cors_origins, ("https://a.example", "https://b.example"))

    def test_invalid_settings_say_what_to_fix(self):
        cases = [({"PORT": "abc"}, "PORT"), ({"PORT": "70000"}, "PORT"),
                 ({"IDLE_TIMEOUT": "-1"}, "IDLE_TIMEOUT"), ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL"),
                 ({"OPENAI_BASE_URL": "https://x/v1?a=1"}, "OPENAI_BASE_URL"),
                 ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"), ({"OA_API_KEY": "sk bad"}, "OA_API_KEY")]
        for env, name in cases:
            with self.subTest(env=env), self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config([], {"OA_API_KEY": "k", **env})
            self.assertIn(name, str(caught.exception))

    def test_a_bad_redis_url_is_named_without_quoting_its_password(self):
        cases = [("http://:pw-Zx81@host:6379/0", "must start with redis://"), ("redis://:pw-Zx81@/0", "needs a host"),
                 ("redis://:pw-Zx81@host:6379/first", "database that is not a number"),
                 ("unix://:pw-Zx81@?db=1", "needs a socket path"), ("redis://:pw-Zx81@host:99999/0", "bad port")]
        for url, reason in cases:
            with self.subTest(reason=reason), self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config([], {"OA_API_KEY": "k", "REDIS_URL": url})
            self.assertIn("REDIS_URL", str(caught.exception))
            self.assertIn(reason, str(caught.exception))
            self.assertNotIn("pw-Zx81", str(caught.exception))
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config([], {"OA_API_KEY": "k", "REDIS_FAILURE_MODE": "maybe"})
        self.assertIn("REDIS_FAILURE_MODE must be open", str(caught.exception))
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config([], {"OA_API_KEY": "k", "STREAM_LEASE": "1", "REDIS_TIMEOUT": "0.5"})
        self.assertIn("STREAM_LEASE (1 s) must be at least three times REDIS_TIMEOUT (0.5 s)", str(caught.exception))

    def test_the_startup_block_says_where_limits_live_and_never_shows_the_redis_password(self):
        def where(**settings):
            lines = [text for _, text in proxy.startup_lines(make_config(**settings), 8080)]
            return "\n".join(lines)
        self.assertIn("per-client limits: none set", where())
        self.assertIn("live in this process: each copy counts alone, and a restart forgets them",
                      where(token_budget_day=5))
        shared = where(rate_limit_rpm=5, redis_url="rediss://proxy:pw-Zx81qq@redis.internal:6380/2")
        self.assertIn("live in Redis at rediss://proxy@redis.internal:6380/2, shared by every copy", shared)
        self.assertNotIn("pw-Zx81qq", shared)
        self.assertIn("nothing is kept there", where(redis_url="redis://redis:6379/0"))

    def test_startup_lines_warn_on_non_loopback(self):
        config = make_config(host="0.0.0.0")
        warnings = [text for level, text in proxy.startup_lines(config, 8080) if level >= logging.WARNING]
        self.assertEqual(len(warnings), 1)
        self.assertIn("anyone who can reach this port can spend the upstream API key", warnings[0])
        for host in ("127.0.0.1", "::1", "localhost"):
            config = make_config(host=host)
            self.assertFalse([t for lvl, t in proxy.startup_lines(config, 8080) if lvl >= logging.WARNING])


def run_proxy_cli(*args, env=None, timeout=10):
    base_env = {k: v for k, v in os.environ.items() if k not in ("OA_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([sys.executable, os.path.join(HERE, "proxy.py"), *args],
                          env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=timeout)


class CommandLineTest(unittest.TestCase):
    def test_help_lists_every_setting_in_groups_with_its_variable_and_default(self):
        result = run_proxy_cli("--help")
        self.assertEqual(result.returncode, 0)
        lines = result.stdout.splitlines()
        self.assertLess(len(lines), 100)
        self.assertEqual([line for line in lines if len(line) > 80], [])
        self.assertIn("python3 proxy.py --demo", "\n".join(lines[:8]))  # the way to try it, at the top
        help_text = re.sub(r"\s+", " ", result.stdout)
        for title in ("upstream:", "listening:", "clients and limits:", "Redis", "timeouts:", "logging and metrics:"):
            self.assertIn(title, help_text)
        for setting in proxy.SETTINGS:
            self.assertIn(setting.flag, help_text)
            shown = f"{' or '.join(setting.envs)}={setting.default or '(none)'}:"
            self.assertIn(shown, help_text.replace("- ", "-"))  # argparse may break a line at a hyphen
        for placeholder in ("OA_API_KEY OA", "--api-key OA_API_KEY", "--port PORT_"):
            self.assertNotIn(placeholder, help_text)  # placeholders name what to give, not a variable

    def test_no_key_exits_2_with_one_line(self):
        result = run_proxy_cli("--port", "0")
        self.assertEqual(result.returncode, 2)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("OA_API_KEY", lines[0])
        self.assertIn("--demo", lines[0])

    def test_every_bad_setting_is_answered_in_plain_words(self):
        # For each setting: values of the wrong type or out of range. A setting that takes any text has none.
        bad = {"api_key": ["two words"], "base_url": ["ftp://x", "not a url", "http://x/v1?q=1"], "model": [],
               "host": [], "port": ["abc", "70000", "-1", "8.5"], "cors_origins": [",", " , "],
               "auth_header": ["two words", "a:b"], "extra_headers": ["X-Title: x", "[1]", '{"X": 1}'],
               "proxy_api_keys": ["short", "a b c d e f g h i j k l m n o p"], "redis_url": ["http://x", "redis://"],
               "redis_failure_mode": ["maybe"], "allowed_models": [], "fallback_base_url": ["nope"],
               "fallback_api_key": [], "fallback_model": [], "fallback_auth_header": ["two words"],
               "log_format": ["xml"], "metrics_token": [], "demo": ["perhaps"],
               "workers": ["0", "-1", "abc", "1.5", "257", "all"],
               "max_connections": ["abc", "0", "-5", "1.5"],
               "routes": ["not json", "{}", "[1]", '[{"models": []}]', '[{"models": ["m"], "upstreams": []}]',
                               '[{"models": ["m"], "upstreams": [{"url": "x"}], "extra": 1}]',
                               '[{"models": ["m"], "upstreams": [{"url": "http://x", "keys": "sk-a b"}]}]',
                               '[{"models": ["m"], "upstreams": [{"url": "nope"}]}]',
                               '[{"models": ["m"], "upstreams": [{"url": "http://x", "keys": "UNSET_VAR_1"}]}]',
                               "@/nonexistent/routes.json"]}
        for setting in proxy.SETTINGS:
            if setting.field in bad:
                continue
            if setting.parse is proxy._parse_positive_float:
                bad[setting.field] = ["abc", "0", "-1", "inf", "nan", "1e999"]
            elif setting.parse in (proxy._parse_count, proxy._parse_size):
                bad[setting.field] = ["abc", "-1", "1.5", "10k"]
        self.assertEqual(set(bad), {setting.field for setting in proxy.SETTINGS})  # every setting is walked
        python_words = ("invalid literal", "could not convert", "base 10", "Traceback", "Error", "int()", "float()")
        for setting in proxy.SETTINGS:
            name = setting.envs[0]
            base = {"OA_API_KEY": "k"} if name != "OA_API_KEY" else {}
            extra = {"OA_FALLBACK_API_KEY": "k"} if name == "OA_FALLBACK_BASE_URL" else {}
            for value in bad[setting.field] + [""]:
                with self.subTest(setting=name, value=value):
                    environ = {**base, **extra, name: value}
                    try:
                        proxy.load_config([], environ)
                    except proxy.ConfigError as error:
                        message = str(error)
                        self.assertIn(name, message)
                        for words in python_words:
                            self.assertNotIn(words, message)
                        if value and not setting.secret and setting.field != "routes":
                            self.assertIn(repr(value), message)  # OA_ROUTES quotes the part that is wrong
                        if setting.secret and setting.field != "routes":  # OA_ROUTES quotes a bad URL
                            self.assertNotIn("got", message)  # what was given is never echoed
                        continue
                    self.assertEqual((value, setting.default), ("", ""), "accepted a bad value")  # empty: none
        for flag, words in (("--port", "PORT"), ("--idle-timeout", "IDLE_TIMEOUT")):
            result = run_proxy_cli(flag, "", env={"OA_API_KEY": "k"})
            self.assertEqual(result.returncode, 2)
            self.assertIn(flag, result.stderr)

    def test_plain_words_for_the_likely_mistakes(self):
        cases = {"PORT": ("abc", "PORT must be a whole number from 0 to 65535, like 8080 (0 picks a free port); "
                                 "got 'abc'"),
                 "IDLE_TIMEOUT": ("abc", "IDLE_TIMEOUT must be a number of seconds above 0, like 30 or 0.5; "
                                         "got 'abc'"),
                 "RATE_LIMIT_RPM": ("-1", "RATE_LIMIT_RPM must be 0 (off) or a whole number above 0, like 60; "
                                          "got '-1'"),
                 "CORS_ORIGINS": ("", "CORS_ORIGINS is set but empty; unset it for the default (*), or give a "
                                      "value")}
        for name, (value, message) in cases.items():
            with self.subTest(name=name), self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config([], {"OA_API_KEY": "k", name: value})
            self.assertEqual(str(caught.exception), message)

    def test_bad_setting_exits_2_with_one_line(self):
        result = run_proxy_cli("--port", "x", env={"OA_API_KEY": "k"})
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("--port", result.stderr)

    def test_a_port_in_use_is_said_like_any_other_setting(self):
        taken = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        for args, env in ((("--port", str(port)), {}), ((), {"PORT": str(port)})):
            result = run_proxy_cli(*args, env={"OA_API_KEY": "k", **env})
            self.assertEqual(result.returncode, 2)
            self.assertEqual(result.stderr.splitlines(), [
                f"proxy.py: cannot listen on http://127.0.0.1:{port}: port {port} is in use by another process; "
                "stop it, or choose another port with PORT or --port (0 picks a free one)"])


# --------------------------------------------------------------------------
# SSE decoding (pure)
# --------------------------------------------------------------------------

class SSEDecoderTest(unittest.TestCase):
    def decode(self, pieces):
        decoder = proxy.SSEDecoder()
        events = []
        for piece in pieces:
            events += decoder.feed(piece)
        return events + decoder.finish()

    def test_variants_real_upstreams_send(self):
        stream = (b": OPENROUTER PROCESSING\r\n\r\n"
                  b"data: {\"a\":1}\r\n\r\n"
                  b"data:{\"b\":2}\n\n"
                  b"\n\n"
                  b"event: error\ndata: {\"c\":3}\n\n"
                  b"data: line1\ndata: line2\rid: 7\rretry: 10\r\r"
                  b"data: caf\xc3\xa9 \xe2\x82\xac\n\n"
                  b"data: [DONE]\n\n")
        want = [("message", '{"a":1}'), ("message", '{"b":2}'), ("error", '{"c":3}'),
                ("message", "line1\nline2"), ("message", "caf\u00e9 \u20ac"), ("message", "[DONE]")]
        self.assertEqual([tuple(e) for e in self.decode([stream])], want)
        for size in (1, 2, 3, 5, 7):
            with self.subTest(split_every=size):
                pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
                self.assertEqual([tuple(e) for e in self.decode(pieces)], want)

    def test_crlf_split_between_reads_is_one_line_end(self):
        events = self.decode([b"data: x\r", b"\n\r", b"\ndata: y\r\n\r\n"])
        self.assertEqual([e.data for e in events], ["x", "y"])

    def test_stream_ending_without_blank_line_or_done(self):
        self.assertEqual([e.data for e in self.decode([b"data: last"])], ["last"])
        self.assertEqual(self.decode([b": only a comment\n"]), [])

    def test_one_megabyte_line(self):
        payload = b"x" * (1024 * 1024)
        pieces = [b"data: "] + [payload[i:i + 8192] for i in range(0, len(payload), 8192)] + [b"\n\n"]
        events = self.decode(pieces)
        self.assertEqual(len(events), 1)
        self.assertEqual(len(events[0].data), len(payload))

    def test_oversized_event_is_an_error_not_a_cut(self):
        decoder = proxy.SSEDecoder(max_event_bytes=1000)
        with self.assertRaises(proxy.UpstreamBadResponse):
            decoder.feed(b"data: " + b"y" * 2000)


# --------------------------------------------------------------------------
# POST /message: streaming
# --------------------------------------------------------------------------

class MessageFrameTest(unittest.TestCase):
    def test_the_template_writes_what_the_json_encoder_writes(self):
        texts = ["", "Hel", 'lo "w\u00f6rld"', "\\", "\n\r\t\b\f\x00\x1f\x7f", "\u2028\u2029", "\U0001f600",
                 "</script>", "{\"content\":1}", "x" * 10000]
        for text in texts:
            for timestamp in (0, 1700000000, 2 ** 40):
                with self.subTest(text=text[:20], timestamp=timestamp):
                    data = json.dumps({"timestamp": timestamp, "content": text}, separators=(",", ":"),
                                      ensure_ascii=False)
                    # U+2028 and U+2029 escaped as Go's encoder writes them (see SeedClientTest)
                    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                    want = b"event:message\ndata:" + data.encode() + b"\n\n"
                    self.assertEqual(proxy.message_frame(timestamp, text), want)
                    self.assertEqual(json.loads(proxy.message_frame(timestamp, text)[len(b"event:message\ndata:"):]),
                                     {"timestamp": timestamp, "content": text})


class MessageStreamTest(ProxyTestCase):
    def test_frames_and_headers_match_the_seed(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="Hel"),
                                             chunk(content='lo "w\u00f6rld"'), chunk(finish="stop"),
                                             usage_chunk(3, 2), DONE])
        response = self.post_message()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertEqual(response.getheader("Cache-Control"), "no-cache")
        self.assertEqual(response.getheader("X-Accel-Buffering"), "no")
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(response.getheader("Connection"), "keep-alive")
        want = ('event:message\ndata:{"timestamp":1700000000,"content":""}\n\n'
                'event:message\ndata:{"timestamp":1700000000,"content":"Hel"}\n\n'
                'event:message\ndata:{"timestamp":1700000000,"content":"lo \\"w\u00f6rld\\""}\n\n'
                'event:message\ndata:{"timestamp":1700000000,"content":""}\n\n'
                'event:done\ndata:{"timestamp":%d,"content":"","finish_reason":"stop","usage":'
                '{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n')
        before = int(time.time())
        text = response.read().decode("utf-8")
        # The done frame is stamped when it is written, as the seed stamped its frames.
        self.assertIn(text, [want % stamp for stamp in range(before, int(time.time()) + 1)])

    def test_upstream_gets_the_key_the_model_and_the_options(self):
        body = chat_body("Hi", temperature=0.5, top_p=0.9, max_tokens=20, stop=["x"], seed=7, model="gpt-4o")
        response = self.post_message(body, headers={"Authorization": "Bearer client-key"})
        response.read()
        self.assertEqual(len(self.upstream.requests), 1)
        received = self.upstream.requests[0]
        self.assertEqual((received.method, received.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(received.headers["Authorization"], f"Bearer {TEST_KEY}")
        sent = received.json()
        self.assertEqual(sent["model"], "gpt-4o")
        self.assertIs(sent["stream"], True)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(sent["messages"], [{"role": "user", "content": "Hi"}])
        for name, value in (("temperature", 0.5), ("top_p", 0.9), ("max_tokens", 20), ("stop", ["x"]), ("seed", 7)):
            self.assertEqual(sent[name], value)

    def test_default_model_when_none_is_named(self):
        self.post_message().read()
        self.assertEqual(self.upstream.requests[0].json()["model"], "gpt-4o-mini")

    def test_each_chunk_is_relayed_at_once(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="first"), hold]
                                      + reply("rest")[1:])
        reader = FrameReader(self.post_message())
        self.assertEqual(parse_frames(reader.next_frame())[0][1]["content"], "")
        frame = reader.next_frame()
        arrived = time.monotonic()
        self.assertEqual(parse_frames(frame)[0][1]["content"], "first")
        self.assertFalse(hold.is_set())  # the upstream is still holding the rest back
        lag = arrived - self.upstream.sent_at[1]
        self.assertLess(lag, 0.2, f"frame arrived {lag:.3f}s after the upstream sent it; want < 0.2s")
        hold.set()
        self.assertEqual(self.contents(parse_frames(reader.rest())), ["rest", ""])

    def test_upstream_split_at_every_byte(self):
        body = (b": OPENROUTER PROCESSING\r\n\r\n"
                + chunk(role="assistant", content="").replace(b"data: ", b"data:").replace(b"\n", b"\r\n")
                + b"\n\n" + b"event: message\n" + chunk(content="caf\u00e9 \u20ac \U0001F600")
                + chunk(content="two") + chunk(finish="stop") + DONE)
        self.upstream.script = Script(steps=[body[i:i + 1] for i in range(len(body))])
        frames = parse_frames(self.post_message().read().decode("utf-8"))
        self.assertEqual(self.contents(frames), ["", "caf\u00e9 \u20ac \U0001F600", "two", ""])
        self.assertEqual(frames[-1], ("done", seed_frame(finish_reason="stop", usage=None)))

    def test_one_megabyte_content(self):
        big = "y" * (1024 * 1024)
        self.upstream.script = Script(steps=reply(big))
        frames = parse_frames(self.post_message().read().decode("utf-8"))
        self.assertEqual(self.contents(frames), ["", big, ""])

    def test_upstream_without_done_still_finishes(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="ok"),
                                             chunk(finish="length")])
        frames = parse_frames(self.post_message().read().decode("utf-8"))
        self.assertEqual(frames[-1], ("done", seed_frame(finish_reason="length", usage=None)))

    def test_connection_is_reused_after_a_stream(self):
        conn = self.connect()
        first = parse_frames(self.post_message(conn=conn).read().decode())
        second = parse_frames(self.post_message(conn=conn).read().decode())
        self.assertEqual([(event, {**data, "timestamp": 0}) for event, data in first],
                         [(event, {**data, "timestamp": 0}) for event, data in second])  # a second may tick between
        self.assertEqual(first[-1][0], "done")
        health = self.request("GET", "/healthz", conn=conn)
        self.assertEqual(json.loads(health.read()), {"status": "ok"})


# --------------------------------------------------------------------------
# POST /message: bad requests
# --------------------------------------------------------------------------

class MessageValidationTest(ProxyTestCase):
    def test_bad_bodies_get_400_saying_what_is_wrong(self):
        cases = [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b"", "empty"),
            (b"\xff\xfe{}", "not UTF-8"),
            (b'{"messages": NaN}', "'messages' is NaN, which JSON cannot carry"),
            (b"{}", "'messages' is required"),
            (b'{"messages": "hi"}', "'messages' must be a list"),
            (b'{"messages": []}', "'messages' is empty"),
            (b'{"messages": ["hi"]}', "messages[0] must be an object"),
            (b'{"messages": [{"content": "hi"}]}', "messages[0].role must be a string"),
            (b'{"messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role must be a string"),
            (b'{"messages": [{"role": {}, "content": "hi"}]}', "messages[0].role must be a string"),
            (chat_body(stream=False), "always streams"),
            (chat_body(stream="yes"), "'stream' must be true"),
            (chat_body(stream=1), "'stream' must be true"),
            (chat_body(temperature="hot"), "'temperature'"),
            (chat_body(top_p=2), "'top_p'"),
            (chat_body(max_tokens=0), "'max_tokens'"),
            (chat_body(max_tokens=True), "'max_tokens'"),
            (chat_body(stop=[1]), "'stop'"),
            (chat_body(seed=1.5), "'seed'"),
            (chat_body(model=""), "'model'"),
        ]
        conn = self.connect()
        for body, message in cases:
            with self.subTest(body=body):
                self.assert_json_error(self.post_message(body, conn=conn), 400, message)
        self.assertEqual(self.upstream.requests, [])
        frames = parse_frames(self.post_message(conn=conn).read().decode())
        self.assertEqual(frames[-1][0], "done")  # the same connection still serves

    def test_unknown_path_is_404(self):
        self.assert_json_error(self.request("GET", "/nope"), 404, "/nope")

    def test_wrong_method_is_405_with_allow(self):
        response = self.request("GET", "/message")
        self.assert_json_error(response, 405, "GET")
        self.assertEqual(response.getheader("Allow"), "POST, OPTIONS")
        response = self.request("DELETE", "/healthz")
        self.assert_json_error(response, 405)
        self.assertEqual(response.getheader("Allow"), "GET, HEAD, OPTIONS")

    def test_oversized_body_is_refused_without_reading_it(self):
        # answered although not one byte of the body was sent
        response = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n")
        self.assert_json_error(response, 413, "10485760", "1048576")
        self.assertEqual(response.getheader("Connection"), "close")

    def test_oversized_body_with_expect_continue_gets_413_not_100(self):
        response = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 2000000\r\n\r\n")
        self.assert_json_error(response, 413)

    def test_chunked_request_body_is_411(self):
        response = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        self.assert_json_error(response, 411, "Content-Length")

    def test_bad_content_length(self):
        for value in (b"abc", b"-5", b"1, 2"):
            with self.subTest(value=value):
                response = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %b\r\n\r\n{}" % value)
                self.assert_json_error(response, 400, "Content-Length")

    def test_body_shorter_than_content_length(self):
        response = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
                                 shut_write=True)
        self.assert_json_error(response, 400, "2 of the 100 bytes")

    def test_protocol_errors_get_json_too(self):
        response = self.send_raw(b"GET /healthz HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n")
        self.assert_json_error(response, 431)


# --------------------------------------------------------------------------
# The Go original's clients, unchanged
# --------------------------------------------------------------------------

JS_LINE = re.compile(r"data:([^\n\r\u2028\u2029]*)")  # /data:(.*)/gm: JavaScript's `.` stops at these too


def seed_ui_reply(body: str) -> str:
    """The reply text as the Go original's demo UI builds it from a /message body.

    Every match of /data:(.*)/gm is JSON.parse'd and its .content appended;
    a frame without one appends the text "undefined", as JavaScript would.
    """
    text = ""
    for data in JS_LINE.findall(body):
        content = json.loads(data).get("content")
        text += "undefined" if content is None else str(content)
    return text


class SeedClientTest(ProxyTestCase):
    """Streams read exactly as the original's UI and hand-written seed clients read them."""

    config_overrides = {"heartbeat_interval": 0.1}

    def read_as_the_seed_ui(self, steps):
        self.upstream.script = Script(steps=steps)
        body = self.post_message().read().decode("utf-8")
        for data in JS_LINE.findall(body):  # a seed-style client: json.loads(data)["content"] on each
            frame = json.loads(data)
            self.assertIsInstance(frame["content"], str)
            self.assertIsInstance(frame["timestamp"], int)
        return body, seed_ui_reply(body)

    def test_a_normal_stream(self):
        body, text = self.read_as_the_seed_ui(reply("Hello", " world", usage=False))
        self.assertEqual(text, "Hello world")
        self.assertEqual(parse_frames(body)[-1], ("done", seed_frame(finish_reason="stop", usage=None)))

    def test_a_stream_with_usage(self):
        body, text = self.read_as_the_seed_ui(reply("Hello", " world"))
        self.assertEqual(text, "Hello world")
        self.assertEqual(parse_frames(body)[-1][1]["usage"]["total_tokens"], 5)

    def test_a_stream_broken_mid_way_gives_the_partial_reply(self):
        body, text = self.read_as_the_seed_ui([chunk(role="assistant", content=""), chunk(content="Hel"),
                                               chunk(content="lo"), ABORT])
        self.assertEqual(text, "Hello")
        event, data = parse_frames(body)[-1]
        self.assertEqual(event, "error")
        self.assertEqual(data["content"], "")
        self.assertEqual(data["error"]["type"], "upstream_error")

    def test_an_error_object_mid_stream_gives_the_partial_reply(self):
        body, text = self.read_as_the_seed_ui([chunk(role="assistant", content=""), chunk(content="Part"),
                                               sse({"error": {"message": "overloaded", "type": "server_error"}})])
        self.assertEqual(text, "Part")
        self.assertEqual(parse_frames(body)[-1][1]["error"]["message"], "overloaded")

    def test_a_stream_with_heartbeats(self):
        body, text = self.read_as_the_seed_ui([chunk(role="assistant", content=""), chunk(content="slow"), 0.35,
                                               chunk(content=" thought"), chunk(finish="stop"), DONE])
        self.assertIn(": keep-alive", body)
        self.assertEqual(text, "slow thought")

    def test_line_and_paragraph_separators_do_not_split_a_frame(self):
        words = "one\u2028two\u2029three\nfour"
        body, text = self.read_as_the_seed_ui(reply(words, usage=False))
        self.assertEqual(text, words)
        self.assertNotIn("\u2028", body)  # escaped as \u2028, as Go's encoder does

    def test_fields_the_seed_ignored_are_accepted_and_not_sent_on(self):
        body = chat_body("Hi", stream=True, user="user-7", conversation_id={"app": 1}, model="gpt-4o")
        response = self.post_message(body)
        self.assertEqual(seed_ui_reply(response.read().decode()), "Hello world")
        self.assertEqual(response.getheader("X-Proxy-Ignored-Fields"), "user, conversation_id")
        sent = self.upstream.requests[0].json()
        self.assertEqual(sorted(sent), ["messages", "model", "stream", "stream_options"])
        self.assertEqual(sent["model"], "gpt-4o")

    def test_every_message_openai_takes_passes_unchanged(self):
        messages = [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Weather?"},
                                                        {"type": "image_url", "image_url": {"url": "data:,x"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "critic", "content": "a role not invented yet", "extra": [1, 2]},
        ]
        response = self.post_message(json.dumps({"messages": messages}).encode())
        self.assertEqual(response.status, 200)
        response.read()
        self.assertEqual(self.upstream.requests[0].json()["messages"], messages)

    def test_the_original_uis_exact_request(self):
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": ""}]}).encode()
        response = self.post_message(body, headers={"Content-Type": "text/event-stream"})
        self.assertEqual(seed_ui_reply(response.read().decode()), "Hello world")
        self.assertEqual(self.upstream.requests[0].json()["messages"][-1], {"role": "assistant", "content": ""})

    def test_the_upstreams_own_400_comes_back(self):
        self.upstream.script = json_script({"error": {"message": "Invalid parameter: messages with role 'tool' "
                                                      "must be a response to a preceding message with 'tool_calls'.",
                                                      "type": "invalid_request_error", "param": "messages.[0].role"}},
                                           status=400)
        response = self.post_message(json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode())
        error = self.assert_json_error(response, 400, "must be a response to a preceding message")
        self.assertEqual(error["param"], "messages.[0].role")


# --------------------------------------------------------------------------
# Hostile input: bodies, heads, paths, resets, logs
# --------------------------------------------------------------------------

class HostileBodyTest(ProxyTestCase):
    def test_json_nested_too_deep_is_400_not_500(self):
        deep = "[" * 100000 + "]" * 100000
        for path, body in (("/message", '{"messages": ' + deep + "}"),
                           ("/v1/chat/completions", '{"model": "m", "messages": ' + deep + "}")):
            with self.subTest(path=path):
                response = self.request("POST", path, body.encode(), {"Content-Type": "application/json"})
                self.assert_json_error(response, 400, "nests arrays or objects too deeply")
        self.assertEqual(self.upstream.requests, [])

    def test_numbers_json_cannot_carry_are_400_naming_the_field(self):
        huge = "1" + "0" * 400
        cases = (('"temperature": 1e999', "temperature", "1e999"),
                 ('"temperature": -1E400', "temperature", "-1E400"),
                 ('"top_p": NaN', "top_p", "NaN"),
                 ('"seed": Infinity', "seed", "Infinity"),
                 ('"seed": -Infinity', "seed", "-Infinity"),
                 ('"seed": ' + huge, "seed", huge[:20]),
                 ('"metadata": {"a": [1, 2.5e308]}', "metadata.a[1]", "2.5e308"))
        for path in ("/message", "/v1/chat/completions"):
            for field, named, shown in cases:
                with self.subTest(path=path, field=field[:30]):
                    body = '{"model": "m", "messages": [{"role": "user", "content": "Hi"}], %s}' % field
                    response = self.request("POST", path, body.encode(), {"Content-Type": "application/json"})
                    error = self.assert_json_error(response, 400, f"'{named}' is {shown}", "JSON cannot carry")
                    self.assertEqual(error["param"], named)
        self.assertEqual(self.upstream.requests, [])

    def test_the_largest_doubles_still_pass(self):
        self.upstream.script = lambda received: json_completion()
        body = b'{"model": "m", "messages": [], "a": 1.7976931348623157e308, "b": -5e-324, "c": 123456789012}'
        response = self.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        self.assertEqual(response.status, 200, response.read())
        self.assertEqual(self.upstream.requests[0].body, body)  # untouched: sent as it came

    def test_a_lone_surrogate_is_sent_on_as_its_escape_not_a_500(self):
        self.upstream.script = lambda received: Script(steps=reply("\ud800", "x\udfff"))
        body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "stream": true, "model": "m"}'
        for path in ("/message", "/v1/chat/completions"):
            with self.subTest(path=path):
                response = self.request("POST", path, body, {"Content-Type": "application/json"})
                text = response.read().decode()
                self.assertEqual(response.status, 200, text)
                sent = self.upstream.requests[-1]
                self.assertIn(b'"a\\ud800b"', sent.body)
                self.assertEqual(sent.json()["messages"][0]["content"], "a\ud800b")
        frames = parse_frames(self.request("POST", "/message", body).read().decode())
        self.assertEqual(self.contents(frames)[1:3], ["\ud800", "x\udfff"])  # the upstream's own, escaped again
        self.assertEqual(frames[-1][0], "done")

    def test_fields_the_proxy_reads_must_have_their_type(self):
        self.server.config = dataclasses.replace(self.config, allowed_models=("m",), max_tokens=100)
        cases = (({"model": ["m"]}, "'model' must be a string; got an array"),
                 ({"model": "m", "max_tokens": "100000"}, "'max_tokens' must be a whole number; got a string"),
                 ({"model": "m", "max_completion_tokens": 1e9}, "'max_completion_tokens' must be a whole number; "
                                                                "got 1000000000.0"),
                 ({"model": "m", "max_tokens": True}, "'max_tokens' must be a whole number; got a boolean"),
                 ({"model": "m", "stream": "yes"}, "'stream' must be true or false; got a string"),
                 ({"model": "m", "stream": True, "stream_options": "x"}, "'stream_options' must be an object"),
                 ({"model": "m", "stream": True, "stream_options": {"include_usage": 1}},
                  "'stream_options.include_usage' must be true or false; got 1"))
        for fields, message in cases:
            with self.subTest(fields=fields):
                body = json.dumps({**fields, "messages": [{"role": "user", "content": "Hi"}]}).encode()
                response = self.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                error = self.assert_json_error(response, 400, message)
                self.assertEqual(error["param"], message.split("'")[1])
        self.assertEqual(self.upstream.requests, [])

    def test_a_client_that_resets_mid_body_is_a_client_left_line_not_an_error(self):
        body = chat_body()
        heads = (b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body),
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body),
                 b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                 b"boundary=b\r\nContent-Length: %d\r\n\r\n" % len(body))
        with self.assertLogs("proxy", "DEBUG") as logs:
            for head in heads:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
                sock.sendall(head + body[:10])
                self.assertTrue(wait_until(lambda: not self.server.wait_idle(0)))  # its handler reads the body
                sock.close()
                self.assertTrue(self.server.wait_idle(5))
        records = [(record.levelname, record.getMessage()) for record in logs.records]
        self.assertEqual([r for r in records if r[0] not in ("INFO", "DEBUG")], [])
        self.assertFalse([r for r in logs.records if r.exc_info], "a traceback was logged")
        access = [message for level, message in records if '"POST /' in message]
        self.assertEqual(len(access), 3, records)
        for line in access:
            self.assertIn("client_left=yes", line)
            self.assertNotRegex(line, r'" 5\d\d ')

    def test_a_model_name_cannot_forge_a_log_line(self):
        self.upstream.script = lambda received: json_completion()
        forged = "gpt-4o\n2026-01-01 00:00:00,000 INFO 10.0.0.1 \"POST /message\" 200 model=x"
        with self.assertLogs("proxy", "INFO") as logs:
            for path, body in (("/v1/chat/completions", json.dumps({"model": forged, "messages": []})),
                               ("/message", json.dumps({"model": forged, "messages": [{"role": "user"}]}))):
                self.request("POST", path, body.encode(), {"Content-Type": "application/json"}).read()
            self.assertTrue(self.server.wait_idle(5))  # each access line is written once its handler ends
        lines = [record.getMessage() for record in logs.records]
        self.assertEqual(len(lines), 2, lines)
        for line in lines:
            self.assertNotIn("\n", line)
            self.assertIn('model=gpt-4o\\x0a2026-01-01\\x2000:00:00,000\\x20INFO', line)


class StrictHeadTest(ProxyTestCase):
    """Heads a strict HTTP/1.1 parser refuses: 400, the connection closed, nothing sent upstream."""

    MALFORMED = {
        "no colon": b"X-No-Colon\r\n",
        "space before the colon": b"Transfer-Encoding : chunked\r\n",
        "space inside a name": b"X Bad: y\r\n",
        "name not a token": b"X(A): 1\r\n",
        "empty name": b": y\r\n",
        "NUL in a value": b"X-A: 1\x002\r\n",
        "bare CR in a value": b"X-A: 1\r2\r\n",
        "bare CR ending a line": b"X-A: 1\rX-B: 2\r\n",
        "control character in a value": b"X-A: 1\x0b2\r\n",
        "obs-fold": b"X-A: 1\r\n Authorization: Bearer evil\r\n",
        "obs-fold with a tab": b"X-A: 1\r\n\tmore\r\n",
    }

    def send_head(self, head, body=b""):
        sock = self.raw_socket()
        sock.sendall(head + body)
        return read_until_closed(sock)

    def assert_refused(self, answer, status=400, *words):
        self.assertEqual(len(STATUS_LINE.findall(answer)), 1, answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
        self.assertIn(b"Connection: close", head)
        message = json.loads(body)["error"]["message"]
        for word in words:
            self.assertIn(word, message)

    def test_an_http_1_1_request_needs_exactly_one_host(self):
        body = chat_body()
        for case, hosts in (("none", b""), ("two", b"Host: a\r\nHost: b\r\n")):
            with self.subTest(case=case):
                answer = self.send_head(b"POST /message HTTP/1.1\r\n%bContent-Length: %d\r\n\r\n" % (hosts, len(body)),
                                        body)
                self.assert_refused(answer, 400, "exactly one Host header (RFC 9112, 3.2)")
        self.assertEqual(self.upstream.requests, [])
        answer = self.send_head(b"GET /healthz HTTP/1.0\r\n\r\n")  # HTTP/1.0 may go without
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])

    def test_malformed_field_lines_are_400_and_reach_nothing(self):
        for case, line in self.MALFORMED.items():
            for method, path in (("GET", b"/v1/models"), ("POST", b"/message")):
                with self.subTest(case=case, path=path):
                    head = b"%s %s HTTP/1.1\r\nHost: x\r\n%bContent-Length: 0\r\n\r\n" % (
                        method.encode(), path, line)
                    self.assert_refused(self.send_head(head), 400, "header line")
        self.assertEqual(self.upstream.heads, [])

    def test_a_request_hidden_in_a_body_is_never_sent_upstream(self):
        for bad in (b"X-Bad : y", b"X-Bad", b"X-A: 1\r\n Authorization: Bearer evil"):
            with self.subTest(bad=bad):
                head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\n%b\r\nContent-Length: %d\r\n\r\n"
                        % (bad, len(SMUGGLED)))
                self.assert_refused(self.send_head(head, SMUGGLED), 400)
        self.assertEqual(self.upstream.heads, [])

    def test_a_transfer_encoding_other_than_chunked_alone_is_400_and_nothing_after_it_is_read(self):
        body = chat_body()
        for coding in (b"", b" ", b"gzip", b"chunked, gzip", b"identity", b"chunked, chunked", b"gzip, chunked"):
            for path in (b"/message", b"/v1/chat/completions", b"/healthz"):
                with self.subTest(coding=coding, path=path):
                    head = (b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding:%b\r\nContent-Length: %d\r\n\r\n" % (path, coding, len(body)))
                    self.assert_refused(self.send_head(head, body + SMUGGLED), 400, "Transfer-Encoding")
        self.assertEqual(self.upstream.heads, [])

    def test_a_chunked_body_is_411_and_the_connection_closes(self):
        head = b"POST /message HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assert_refused(self.send_head(head, b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED), 411, "Content-Length")
        self.assertEqual(self.upstream.heads, [])

    def test_malformed_request_lines_are_400(self):
        for line in (b"GET /v1/mo\x01dels HTTP/1.1", b"GET  /v1/models HTTP/1.1", b"GET /v1/models\tHTTP/1.1",
                     b"G(T /v1/models HTTP/1.1", b"GET /v1/caf\xc3\xa9 HTTP/1.1"):
            with self.subTest(line=line):
                answer = self.send_head(line + b"\r\nHost: x\r\n\r\n")
                self.assertRegex(answer[:12], rb"HTTP/1\.[01] 4\d\d")
                self.assertEqual(len(STATUS_LINE.findall(answer)), 1, answer[:300])
        self.assertEqual(self.upstream.heads, [])

    def test_a_head_over_the_limit_is_431(self):
        fields = b"".join(b"X-Filler-%d: %s\r\n" % (number, b"a" * 1000) for number in range(80))
        self.assert_refused(self.send_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"), 431,
                            "72 KiB")

    def test_well_formed_edge_cases_are_served(self):
        self.upstream.script = json_script({"data": []})
        for head in (b"GET /v1/models HTTP/1.1\nHost: x\nConnection: close\n\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Tab:\tva\tlue\t\r\nX-Empty:\r\n"
                     b"X-Latin: caf\xe9\r\nConnection: close\r\n\r\n"):
            with self.subTest(head=head):
                answer = self.send_head(head)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertEqual(len(self.upstream.heads), 2)


class LogBoundTest(ProxyTestCase):
    def test_every_log_line_is_bounded_in_both_formats(self):
        self.upstream.script = lambda received: json_completion()
        huge = "m" * 300000
        with self.assertLogs("proxy", "INFO") as logs:
            self.request("POST", "/v1/chat/completions", json.dumps({"model": huge, "messages": []}).encode(),
                         {"Content-Type": "application/json"}).read()
            self.assertTrue(self.server.wait_idle(5))
        try:
            raise ValueError("x" * 300000)
        except ValueError:
            failure = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "bug: %s", ("y" * 300000,),
                                        sys.exc_info())
        for formatter in (proxy.TextLogFormatter(), proxy.JsonLogFormatter()):
            for record in logs.records + [failure]:
                with self.subTest(formatter=type(formatter).__name__, message=record.msg[:20]):
                    line = formatter.format(record)
                    self.assertLess(len(line), 3 * proxy.LOG_LINE_LIMIT)
                    if type(formatter) is proxy.JsonLogFormatter:
                        json.loads(line)  # still one whole JSON object

    def test_every_record_is_one_line_by_any_rule_in_both_formats(self):
        self.upstream.script = lambda received: json_completion()
        odd = "m\u2028a\u2029b\x85c\u202ed\u2066e\u200ff\x0bg\x0ch\x1ci\x1dj\x1ek\rl\nn\ud800o"
        body = json.dumps({"model": odd, "messages": [{"role": "user", "content": "Hi"}]}).encode()  # ASCII escapes
        with self.assertLogs("proxy", "INFO") as logs:
            for path in ("/v1/chat/completions", "/message"):
                self.request("POST", path, body, {"Content-Type": "application/json"}).read()
            self.assertTrue(self.server.wait_idle(5))
        try:
            raise ValueError(odd)  # a traceback, its message as odd as the model name
        except ValueError:
            failure = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "bug near %s", (odd,), sys.exc_info())
        records = logs.records + [failure]
        self.assertEqual(len(records), 3, [record.getMessage() for record in records])
        for formatter in (proxy.TextLogFormatter(), proxy.JsonLogFormatter()):
            for record in records:
                with self.subTest(formatter=type(formatter).__name__, message=record.getMessage()[:20]):
                    line = formatter.format(record)
                    self.assertEqual(line.splitlines(), [line])  # Python's rule splits at every one of them
                    self.assertNotRegex(line, "[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
                    if type(formatter) is proxy.JsonLogFormatter:
                        parsed = json.loads(line)
                        self.assertIn(odd, [parsed.get("model"), parsed.get("message", "")[len("bug near "):]])
                        if record is failure:
                            self.assertIn("ValueError", parsed["traceback"])
                    else:
                        self.assertIn("m\\u2028a\\u2029b\\x85c\\u202ed", line)

    def test_a_traceback_that_quotes_a_secret_is_masked(self):
        try:
            raise http.client.BadStatusLine(f"HTTP/1.1 {ECHO_UPSTREAM_KEY}")  # an upstream's echo, in a bug's traceback
        except http.client.BadStatusLine:
            failure = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "bug near %s", (ECHO_CLIENT_KEY,),
                                        sys.exc_info())
        for formatter in (proxy.TextLogFormatter(ECHO_SECRETS), proxy.JsonLogFormatter(ECHO_SECRETS)):
            with self.subTest(formatter=type(formatter).__name__):
                line = formatter.format(failure)
                self.assertIn("BadStatusLine", line)
                for secret in ECHO_SECRETS:
                    self.assertNotIn(secret, line)


# --------------------------------------------------------------------------
# Upstream failures, and an upstream that echoes secrets
# --------------------------------------------------------------------------

class UpstreamErrorTest(ProxyTestCase):
    config_overrides = {"idle_timeout": 0.5}

    def test_unreachable_upstream_is_502(self):
        self.server.config = dataclasses.replace(self.config, base_url=f"http://127.0.0.1:{free_port()}/v1")
        error = self.assert_json_error(self.post_message(), 502, "could not reach the upstream")
        self.assertEqual(error["type"], "upstream_unreachable")

    def test_upstream_replying_nonsense_is_502(self):
        self.upstream.script = Script(headers={"Content-Type": "text/html"}, body=b"<html>hello</html>")
        self.assert_json_error(self.post_message(), 502, "text/html")

    def test_silent_upstream_before_headers_is_504(self):
        self.upstream.script = Script(hold_headers=True)
        error = self.assert_json_error(self.post_message(), 504, "0.5 s")
        self.assertEqual(error["type"], "upstream_timeout")

    def test_upstream_4xx_keeps_status_and_message(self):
        upstream_error = {"error": {"message": "This model's maximum context length is 128000 tokens.",
                                    "type": "invalid_request_error", "param": "messages",
                                    "code": "context_length_exceeded"}}
        self.upstream.script = Script(status=400, headers={"Content-Type": "application/json"},
                                      body=json.dumps(upstream_error).encode())
        error = self.assert_json_error(self.post_message(), 400, "maximum context length")
        self.assertEqual(error, upstream_error["error"])

    def test_upstream_429_keeps_retry_after(self):
        self.upstream.script = Script(status=429, headers={"Content-Type": "application/json", "Retry-After": "7"},
                                      body=b'{"error": {"message": "Rate limit reached", "type": "requests"}}')
        response = self.post_message()
        self.assert_json_error(response, 429, "Rate limit reached")
        self.assertEqual(response.getheader("Retry-After"), "7")

    def test_upstream_auth_failure_is_502_without_key_material(self):
        for status in (401, 403):
            with self.subTest(status=status):
                leak = {"error": {"message": f"Incorrect API key provided: {TEST_KEY[:8]}****{TEST_KEY[-4:]}",
                                  "type": "invalid_request_error", "code": "invalid_api_key"}}
                self.upstream.script = Script(status=status, headers={"Content-Type": "application/json"},
                                              body=json.dumps(leak).encode())
                response = self.post_message()
                raw = response.read()
                self.assertEqual(response.status, 502)
                error = json.loads(raw)["error"]
                self.assertIn("refused the proxy's API key", error["message"])
                self.assertIn("must fix --api-key", error["message"])  # where make_config's key came from
                self.assertEqual((error["type"], error["code"]), ("upstream_auth_error", "upstream_key_refused"))
                self.assertEqual(response.getheader("x-should-retry"), "false")
                for fragment in (TEST_KEY, TEST_KEY[:8], TEST_KEY[-4:], "Incorrect API key"):
                    self.assertNotIn(fragment.encode(), raw)

    def test_a_refused_key_is_a_warning_at_most_once_a_minute_naming_its_setting(self):
        self.upstream.script = json_script({"error": {"message": "Incorrect API key"}}, status=401)
        with self.assertLogs("proxy", "WARNING") as logs:
            for _ in range(3):
                self.assertEqual(self.post_message().status, 502)
            self.server.wait_idle(5)
        warnings = [line for line in logs.output if "refused the proxy's API key" in line]
        self.assertEqual(len(warnings), 1, logs.output)  # the first at once; the next two wait for the minute
        self.assertIn("WARNING:proxy:the primary upstream refused the proxy's API key 1 time(s)", warnings[0])
        self.assertIn("until --api-key is fixed", warnings[0])
        log = proxy.FloodLog(logging.WARNING, "refused %d time(s)", every=60)
        with self.assertLogs("proxy", "WARNING") as logs:
            for moment in (0, 10, 20, 61, 62):  # the count since the last line, once the minute has passed
                log.count(moment)
        self.assertEqual(logs.output, ["WARNING:proxy:refused 1 time(s)", "WARNING:proxy:refused 3 time(s)"])

    def test_the_message_names_the_variable_the_key_came_from(self):
        for environ, name in (({"OPENAI_API_KEY": "k"}, "OPENAI_API_KEY"), ({"OA_API_KEY": "k"}, "OA_API_KEY")):
            config = proxy.load_config([], environ)
            self.assertIn(f"must fix {name};", proxy.upstream_key_refused(401, config, "primary").message)
        config = proxy.load_config([], {"OA_API_KEY": "k", "OA_FALLBACK_BASE_URL": "http://127.0.0.1:9/v1",
                                        "OA_FALLBACK_API_KEY": "f"})
        self.assertIn("must fix OA_FALLBACK_API_KEY;", proxy.upstream_key_refused(403, config, "fallback").message)

    def test_upstream_5xx_is_502_with_its_status(self):
        self.upstream.script = Script(status=503, headers={"Content-Type": "application/json", "Retry-After": "3"},
                                      body=b'{"error": {"message": "overloaded", "type": "server_error"}}')
        response = self.post_message()
        self.assert_json_error(response, 502, "503", "overloaded")
        self.assertEqual(response.getheader("Retry-After"), "3")

    def test_upstream_echoing_the_key_is_redacted(self):
        self.upstream.script = Script(status=400, headers={"Content-Type": "application/json"},
                                      body=json.dumps({"error": {"message": f"bad header {TEST_KEY}"}}).encode())
        response = self.post_message()
        self.assertNotIn(TEST_KEY.encode(), response.read())


class KeyEchoTest(RawUpstreamTestCase):
    """An upstream that quotes the proxy's secrets everywhere it can: none reaches a client or the log."""

    def assert_no_secret(self, text):
        flat = re.sub(r"\s|\\[nrt]", "", text).lower()
        for secret in ECHO_SECRETS:
            for start in range(len(secret) - 5):
                self.assertNotIn(secret[start:start + 6].lower(), flat, f"a piece of {secret} got through")

    def test_no_secret_reaches_a_client_or_the_log(self):
        want = {"/v1/models": {"reason": 400, "headers": 200, "problem": 400, "octet": 400, "big": 502,
                               "big-chunked": 502, "split-json": 400, "split-text": 500, "bad-status": 502,
                               "stream-error": 200},
                "/message": {"reason": 400, "headers": 502, "problem": 400, "split-json": 400, "split-text": 502,
                             "bad-status": 502, "big": 400, "stream-error": 200}}
        got = []
        with self.assertLogs("proxy", "DEBUG") as logs:
            for path, modes in want.items():
                method, body = ("GET", b"") if path.startswith("/v1") else ("POST", chat_body())
                for mode, status in modes.items():
                    with self.subTest(path=path, mode=mode):
                        answer = self.exchange(mode, method, path, body)
                        self.assertRegex(answer[:13], rb"HTTP/1\.1 %d " % status)
                        self.assert_no_secret(answer.decode("latin-1"))
                        got.append(answer)
            self.assertTrue(self.server.wait_idle(5))
        self.assertIn(b"HTTP/1.1 400 Bad Request\r\n", got[0])  # the standard reason, not the upstream's
        self.assertIn(b"\x00\xff[redacted]", got[3])  # a binary body keeps its other bytes
        self.assertTrue(any(b"X-Request-Id: [redacted]" in answer for answer in got))
        self.assert_no_secret("\n".join(logs.output))
        self.assertIn("request_id=[redacted]", "\n".join(logs.output))


class KeyMeaningTest(RawUpstreamTestCase):
    """Masking by meaning: an upstream hides the secrets in every field of an error, in JSON escapes,
    duplicate fields, splits and fragments, in bodies and in event streams of every framing."""

    MODES = sorted(meaning_echoes(*ECHO_SECRETS))

    def assert_no_fragment(self, text):
        decoded = re.sub(r"\\u([0-9a-fA-F]{4})", lambda match: chr(int(match.group(1), 16)), text)
        flat = re.sub(r"\s|\\[nrt]", "", decoded).lower()
        for secret in ECHO_SECRETS:
            for start in range(len(secret) - proxy.SECRET_FRAGMENT + 1):
                self.assertNotIn(secret[start:start + proxy.SECRET_FRAGMENT].lower(), flat,
                                 f"a piece of {secret} got through")

    def test_no_fragment_of_a_secret_reaches_a_client_or_either_log(self):
        routes = (("POST", "/message", chat_body()), ("POST", "/v1/chat/completions", v1_chat(True)),
                  ("GET", "/v1/models", b""))
        with self.assertLogs("proxy", "DEBUG") as logs:
            for mode in self.MODES:
                for method, path, body in routes:
                    with self.subTest(mode=mode, path=path):
                        answer = self.exchange(mode, method, path, body).decode("latin-1")
                        self.assertRegex(answer[:13], r"HTTP/1\.1 [245]\d\d ")
                        self.assertNotRegex(answer[:13], r"HTTP/1\.1 500 " if mode != "error-text-escaped" else "^$")
                        self.assert_no_fragment(answer)
                        if mode.startswith("stream-") and path != "/v1/models":
                            self.assertIn("Transfer-Encoding: chunked", answer)  # sized or not, masked event by event
            self.assertTrue(self.server.wait_idle(5))
        for formatter in (proxy.TextLogFormatter(ECHO_SECRETS), proxy.JsonLogFormatter(ECHO_SECRETS)):
            self.assert_no_fragment("\n".join(formatter.format(record) for record in logs.records))
        self.assertFalse([record.getMessage() for record in logs.records if record.exc_info])

    def test_an_error_keeps_its_shape_with_every_string_masked(self):
        answer = self.exchange("error-fields", "GET", "/v1/models")
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]  # still JSON, encoded again
        self.assertEqual(error, {"message": "bad [redacted]", "type": "[redacted]", "code": "[redacted]",
                                 "param": "[redacted]",
                                 "detail": {"nested": ["x [redacted]", {"[redacted]": "[redacted]"}]}})
        head, _, body = self.exchange("stream-fields-length", "POST", "/message", chat_body()).partition(b"\r\n\r\n")
        frames = parse_frames(http_chunks(body).decode())
        self.assertEqual(frames[-1], ("error", seed_frame(error={"message": "bad [redacted]", "type": "[redacted]",
                                                                 "code": "[redacted]", "param": "[redacted]"})))
        answer = self.exchange("error-duplicate", "POST", "/message", chat_body())
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"], "x")

    def test_model_output_is_not_masked(self):
        # By design: what the model writes is the client's answer, relayed as it is, whatever it holds.
        answer = self.exchange("stream-output", "POST", "/v1/chat/completions", v1_chat(True))
        self.assertIn(f'"content": "{ECHO_UPSTREAM_KEY}"', http_chunks(answer.partition(b"\r\n\r\n")[2]).decode())
        answer = self.exchange("stream-output", "POST", "/message", chat_body())
        frames = parse_frames(http_chunks(answer.partition(b"\r\n\r\n")[2]).decode())
        self.assertEqual(self.contents(frames)[0], ECHO_UPSTREAM_KEY)


# Client keys made of ordinary words: every 8 characters of one is a "fragment" the masking looks for.
WORDY_KEYS = (("frontend", "frontend-application-json-key-01"), ("mobile", "team-mobile-text-event-stream-2026"),
              ("cache", "cache-control-no-cache-must-revalidate-key"), ("agent", "my-upstream-response-failed-key"))


class ProtocolValuesTest(ProxyTestCase):
    """Masking never alters what is not a secret: an upstream header from a fixed vocabulary passes as it
    is, whatever words the client keys are made of; any other value is still masked."""

    config_overrides = {"proxy_api_keys": WORDY_KEYS}

    def test_vocabulary_headers_pass_unchanged_whatever_the_client_keys_hold(self):
        cases = (
            ("frontend", json_script({"object": "list", "data": []}, headers={
                "Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-cache, must-revalidate",
                "Vary": "Origin, Accept-Encoding", "X-Content-Type-Options": "nosniff"}), b"", "GET", "/v1/models"),
            ("mobile", Script(steps=reply("Hi")), v1_chat(True), "POST", "/v1/chat/completions"),
        )
        for name, script, body, method, path in cases:
            with self.subTest(path=path):
                self.upstream.script = script
                key = dict(WORDY_KEYS)[name]
                response = self.request(method, path, body, bearer(key))
                text = response.read()
                self.assertEqual(response.status, 200)
                for header, value in script.headers.items():
                    self.assertEqual(response.getheader(header), value)
                self.assertNotIn(b"[redacted]", text)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertIn(b"data: [DONE]", text)

    def test_the_apis_own_words_pass_unchanged_in_errors_and_error_events(self):
        key = dict(WORDY_KEYS)["agent"]  # holds "upstream" and "response"
        self.upstream.script = json_script({"error": {"message": "too long", "type": "invalid_request_error",
                                                      "code": "context_length_exceeded"}}, status=400)
        response = self.request("POST", "/v1/chat/completions", v1_chat(False), bearer(key))
        self.assertEqual(json.loads(response.read())["error"], {
            "message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"})
        self.upstream.script = json_script({"id": "x"})  # /message wants an event stream: the proxy's own error
        response = self.request("POST", "/message", chat_body(), bearer(key))
        self.assertEqual(response.status, 502)
        self.assertEqual(json.loads(response.read())["error"]["type"], "upstream_error")
        failed = {"type": "response.failed", "sequence_number": 3,
                  "response": {"id": "resp_1", "status": "failed", "error": {"code": "server_error", "message": "boom"}}}
        self.upstream.script = Script(steps=[b"event: response.failed\ndata: " + json.dumps(failed).encode() + b"\n\n"])
        response = self.request("POST", "/v1/responses", json.dumps({"model": "m", "input": "hi", "stream": True}),
                                bearer(key))
        events = proxy.SSEDecoder().feed(response.read())
        self.assertEqual([(event.event, json.loads(event.data)) for event in events], [("response.failed", failed)])

    def test_a_value_outside_the_vocabulary_is_still_masked(self):
        secret = WORDY_KEYS[0][1]
        self.upstream.script = json_script({"object": "list", "data": []}, headers={
            "Content-Type": f"application/json; note={secret}", "Cache-Control": f"no-cache, {secret}",
            "X-Echo": "application/json"})  # not a vocabulary header: its words are a fragment, masked
        response = self.request("GET", "/v1/models", None, bearer(secret))
        response.read()
        for header in ("Content-Type", "Cache-Control", "X-Echo"):
            self.assertIn("[redacted]", response.getheader(header))
            self.assertNotIn(secret[:8], response.getheader(header))


class InterimResponseTest(RawUpstreamTestCase):
    def test_interim_responses_are_skipped_not_relayed_as_the_answer(self):
        for path, method, body in (("/v1/chat/completions", "POST", v1_chat(True)),
                                   ("/message", "POST", chat_body())):
            with self.subTest(path=path):
                answer = self.exchange("early-hints", method, path, body)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100])
                self.assertEqual(len(STATUS_LINE.findall(answer)), 1)
                self.assertIn(b"Hi", answer)
                self.assertNotIn(b"style.css", answer)

    def test_endless_interim_responses_and_a_101_are_a_502(self):
        for mode in ("endless-hints", "switching"):
            with self.subTest(mode=mode):
                answer = self.exchange(mode, "GET", "/v1/models")
                self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer[:100])


class UpstreamHeadTest(RawUpstreamTestCase):
    """The upstream's response head is read by the proxy's own strict parser (read_fields)."""

    def test_malformed_heads_are_a_502_never_a_body(self):
        for mode in ("field-without-colon", "space-before-colon", "two-lengths", "cut-head", "many-fields"):
            with self.subTest(mode=mode):
                answer = self.exchange(mode, "GET", "/v1/models")
                self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer[:200])
                body = json.loads(answer.partition(b"\r\n\r\n")[2])
                self.assertEqual(body["error"]["type"], "upstream_error", body)

    def test_a_folded_field_is_joined_with_a_space(self):
        answer = self.exchange("folded-field", "GET", "/v1/models")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200])
        self.assertIn(b"\r\nX-Folded: one two\r\n", answer)
        self.assertTrue(answer.endswith(b"\r\n\r\n{}"), answer[-50:])

    def test_fields_read_as_email_read_them(self):
        fields = proxy.read_fields(io.BytesIO(b"Content-Type: Text/Event-Stream; charset=utf-8\r\n"
                                              b"X-Twice: a\r\nx-twice:  b \r\nEmpty:\r\n\r\nbody"), 100)
        self.assertEqual(fields.get_content_type(), "text/event-stream")
        self.assertEqual((fields.get("X-TWICE"), fields["x-twice"], fields.get_all("X-Twice")), ("a", "a", ["a", "b"]))
        self.assertEqual((fields.get("empty"), fields.get("missing", "-"), fields.get_all("missing")), ("", "-", None))
        self.assertEqual(fields.items(), [("Content-Type", "Text/Event-Stream; charset=utf-8"), ("X-Twice", "a"),
                                          ("x-twice", "b"), ("Empty", "")])
        self.assertTrue("X-TWICE" in fields and "missing" not in fields)
        self.assertEqual(proxy.read_fields(io.BytesIO(b"\r\n"), 100).get_content_type(), "text/plain")


class MidStreamErrorTest(ProxyTestCase):
    config_overrides = {"idle_timeout": 0.5}

    def assert_error_ending(self, want_type, *message_parts):
        response = self.post_message()
        self.assertEqual(response.status, 200)
        frames = parse_frames(response.read().decode())  # a clean chunked end, or read() would raise
        self.assertEqual(self.contents(frames), ["", "partial"])
        event, data = frames[-1]
        self.assertEqual(event, "error", frames)
        self.assertEqual(data["error"]["type"], want_type)
        for part in message_parts:
            self.assertIn(part, data["error"]["message"])

    def test_upstream_closing_early(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"), ABORT])
        self.assert_error_ending("upstream_error", "broke")

    def test_upstream_ending_before_the_reply_finished(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial")])
        self.assert_error_ending("upstream_error", "before the reply was finished")

    def test_upstream_error_object_mid_stream(self):
        self.upstream.script = Script(steps=[
            chunk(role="assistant", content=""), chunk(content="partial"),
            sse({"error": {"message": "The server had an error while processing your request.",
                           "type": "server_error"}}), HANG])
        self.assert_error_ending("server_error", "server had an error")

    def test_upstream_silent_past_idle_timeout(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"), HANG])
        self.assert_error_ending("upstream_timeout", "nothing for 0.5 s")

    def test_upstream_sending_garbage_mid_stream(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"),
                                             b"data: {oops\n\n", HANG])
        self.assert_error_ending("upstream_error", "not JSON")


# --------------------------------------------------------------------------
# Clients that leave, stall, or never finish their request
# --------------------------------------------------------------------------

class ClientDisconnectTest(ProxyTestCase):
    def assert_upstream_closed_after(self, sock, baseline):
        sock.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0), "the upstream was not hung up on within 1 s")
        self.assertTrue(self.server.wait_idle(2.0), "the handler did not end")
        self.assertTrue(wait_until(lambda: thread_count() <= baseline),
                        f"{thread_count()} threads; want {baseline}")

    def start_stream(self):
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return sock

    def test_mid_stream(self):
        baseline = thread_count()
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="a"), HANG])
        sock = self.start_stream()
        received = b""
        while b'"content":"a"' not in received:
            data = sock.recv(4096)
            self.assertTrue(data, "stream ended early")
            received += data
        self.assert_upstream_closed_after(sock, baseline)

    def test_before_the_first_token(self):
        baseline = thread_count()
        self.upstream.script = Script(steps=[HANG])
        sock = self.start_stream()
        self.assertIn(b"200 OK", sock.recv(4096))
        self.assert_upstream_closed_after(sock, baseline)

    def test_before_the_upstream_answers(self):
        baseline = thread_count()
        self.upstream.script = Script(hold_headers=True)
        sock = self.start_stream()
        self.assertTrue(wait_until(lambda: self.upstream.requests), "the request never reached the upstream")
        self.assert_upstream_closed_after(sock, baseline)


class ClientResetTest(ProxyTestCase):
    """A client that resets at any point is one client_left line at INFO: no ERROR, no traceback, no 5xx."""

    def setUp(self):
        super().setUp()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "big.js"), "w") as file:
            file.write("//" + "x" * (8 << 20) + "\n")  # more than any socket buffers hold
        self.server.ui = proxy.load_ui(pathlib.Path(folder))

    def send(self, head, body=b""):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the proxy's writes block soon
        sock.settimeout(5)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(head + body)
        return sock

    def reset_while_the_proxy_writes_a_file(self):
        sock = self.send(b"GET /ui/big.js HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", sock.recv(1024))  # it is writing, and cannot finish: 8 MiB
        reset(sock)

    def reset_while_the_upstream_is_awaited(self, head, body):
        self.upstream.script = Script(hold_headers=True)
        count = len(self.upstream.requests)
        sock = self.send(head, body)
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) > count))
        reset(sock)
        self.assertTrue(self.upstream.disconnected.wait(2))
        self.upstream.disconnected.clear()

    def reset_mid_stream(self, head, body, marker):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="a"), HANG])
        sock = self.send(head, body)
        received = b""
        while marker not in received:
            data = sock.recv(4096)
            self.assertTrue(data, "stream ended early")
            received += data
        reset(sock)
        self.assertTrue(self.upstream.disconnected.wait(2))
        self.upstream.disconnected.clear()

    def test_resets_at_every_point_are_client_left_lines(self):
        message = chat_body()
        message_head = b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(message)
        v1 = v1_chat(True)
        v1_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(v1))
        with self.assertLogs("proxy", "DEBUG") as logs:
            self.reset_while_the_proxy_writes_a_file()
            self.assertTrue(wait_until(lambda: self.server.wait_idle(0)))
            self.reset_while_the_upstream_is_awaited(message_head, message)
            self.reset_while_the_upstream_is_awaited(v1_head, v1)
            self.reset_mid_stream(message_head, message, b'"content":"a"')
            self.reset_mid_stream(v1_head, v1, b'"content": "a"')
            self.assertTrue(self.server.wait_idle(5))
        self.assertFalse([record for record in logs.records if record.levelno >= logging.WARNING or record.exc_info],
                         logs.output)
        access = [record.getMessage() for record in logs.records if hasattr(record, "access")]
        self.assertEqual(len(access), 5, access)
        for line in access:
            self.assertIn("client_left=yes", line)
        metrics = self.server.metrics.render({})
        self.assertNotRegex(metrics, r'proxy_requests_total\{[^}]*status="5')
        self.assertIn("proxy_client_disconnects_total 4", metrics)


class HeartbeatTest(ProxyTestCase):
    config_overrides = {"heartbeat_interval": 0.2}

    def test_keep_alive_comments_during_silence_and_only_between_frames(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), hold] + reply("after")[1:])
        reader = FrameReader(self.post_message())
        frames = []
        while sum(1 for f in frames if f.startswith(":")) < 2 and len(frames) < 20:
            frames.append(reader.next_frame())
        hold.set()
        text = "".join(frames) + reader.rest()
        parsed = parse_frames(text)  # every frame parses whole: nothing was interleaved
        self.assertEqual(parsed[0][0], "message")
        self.assertEqual(parsed[1:3], [("comment", "keep-alive")] * 2)
        self.assertEqual(self.contents(parsed), ["", "after", ""])
        self.assertEqual(parsed[-1][0], "done")
        self.assertIn(": keep-alive\n\n", text)


class SlowClientTest(ProxyTestCase):
    config_overrides = {"client_timeout": 1.0, "body_timeout": 1.0}

    def test_stuck_client_does_not_hold_up_others_and_is_dropped(self):
        big = [chunk(content="z" * 60000) for _ in range(200)]  # about 12 MB, far past socket buffers
        self.upstream.script = lambda received: (
            Script(steps=[chunk(role="assistant", content="")] + big + [chunk(finish="stop"), DONE])
            if "stuck" in received.body.decode() else Script(steps=reply("quick")))
        start_stuck_client(self)
        self.assertTrue(wait_until(lambda: self.upstream.sent_at), "the stuck stream never started")
        started = time.monotonic()
        frames = parse_frames(self.post_message(chat_body("other")).read().decode())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(self.contents(frames), ["", "quick", ""])
        self.assertTrue(self.upstream.disconnected.wait(5), "the stuck client's upstream was never closed")

    def test_client_that_never_sends_its_body_is_dropped(self):
        sock = self.raw_socket()
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        health = self.request("GET", "/healthz")  # others are served meanwhile
        self.assertEqual(health.status, 200)
        started = time.monotonic()
        response = http.client.HTTPResponse(sock)
        response.begin()
        self.assert_json_error(response, 408, "did not arrive")
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(sock.recv(10), b"")  # and the connection is closed
        self.assertEqual(self.upstream.requests, [])


class RelayLoopTest(ProxyTestCase):
    """Once its head is out, a response is carried by the one relay loop: no thread a stream, one slow
    client harms nobody, a client leaving is noticed at once, heartbeats fall only between events."""

    config_overrides = {"client_timeout": 1.0, "heartbeat_interval": 0.2, "max_streams": 1000}

    def test_300_running_streams_hold_no_thread_of_their_own(self):
        require(os.path.isdir("/proc/self/task"), "Linux's /proc, to count a process's threads")
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), hold] + reply("end")[1:])
        process = ProxyProcess("--base-url", self.upstream.base_url, env={"OA_API_KEY": TEST_KEY})
        self.addCleanup(process.kill)

        def threads():
            return len(os.listdir(f"/proc/{process.process.pid}/task"))

        baseline = threads()  # the workers' minimum, the connections' thread, the loop, the log's, main
        socks, body = [], chat_body()
        for _ in range(300):  # one after another, as a steady flow of users: each worker is free again at once
            sock = socket.create_connection(("127.0.0.1", process.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            self.assertIn(b"event:message", read_until_closed_or(sock, b"event:message", 10))
            socks.append(sock)
        running = threads()
        self.assertLessEqual(running, baseline + 5, f"{running} threads with 300 streams running; {baseline} before")
        hold.set()
        for sock in socks:
            self.assertTrue(read_until_closed_or(sock, b"0\r\n\r\n", 10).endswith(b"0\r\n\r\n"))

    def test_a_stuck_client_costs_another_stream_no_delay_and_is_dropped_at_client_timeout(self):
        big = [chunk(content="z" * 60000) for _ in range(200)]  # about 12 MB, far past socket buffers
        gates = [threading.Event() for _ in range(5)]
        for gate in gates:
            self.addCleanup(gate.set)
        steps = [chunk(role="assistant", content="")]
        for number, gate in enumerate(gates):
            steps += [gate, chunk(content=f"w{number}")]
        self.upstream.script = lambda received: (
            Script(steps=[chunk(role="assistant", content="")] + big + [chunk(finish="stop"), DONE])
            if "stuck" in received.body.decode() else Script(steps=steps + reply()[-3:]))
        start_stuck_client(self)
        self.assertTrue(wait_until(lambda: len(self.upstream.sent_at) > 10), "the stuck stream never started")
        stuck_since = time.monotonic()
        reader = FrameReader(self.post_message(chat_body("other")))
        reader.next_frame()
        delays = []
        for number, gate in enumerate(gates):
            released = time.monotonic()
            gate.set()
            self.assertIn(f"w{number}", reader.next_frame())
            delays.append(time.monotonic() - released)
        self.assertLess(max(delays), 0.05, f"chunk delays {delays} beside a stuck client")
        self.assertTrue(self.upstream.disconnected.wait(5), "the stuck client's upstream was never closed")
        dropped_after = time.monotonic() - stuck_since
        self.assertLess(dropped_after, 1.0 + 2.0, f"dropped {dropped_after:.2f} s after it stopped reading")

    def test_a_client_leaving_during_the_upstreams_silence_closes_it_within_100_ms(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), HANG])
        for path, body in (("/message", chat_body()), ("/v1/chat/completions", v1_chat(True))):
            with self.subTest(path=path):
                self.upstream.disconnected.clear()
                sock = self.raw_socket()
                sock.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(body), body))
                read_until_closed_or(sock, b"\r\n\r\n", 5)
                self.assertTrue(wait_until(lambda: self.server.relays.running == 1, 5))
                left = time.monotonic()
                sock.close()
                self.assertTrue(self.upstream.disconnected.wait(1), "the upstream was not hung up on")
                # The fake upstream looks for the hang-up every 50 ms; the rest is the proxy's.
                self.assertLess(time.monotonic() - left, 0.1 + 0.05)

    def test_heartbeats_fall_between_events_split_across_upstream_writes(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        event = chunk(content="split")
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), event[:20], hold, event[20:]]
                                      + reply()[-3:])
        for path, body in (("/message", chat_body()), ("/v1/chat/completions", v1_chat(True))):
            with self.subTest(path=path):
                hold.clear()
                response = self.request("POST", path, body, {"Content-Type": "application/json"})
                reader = FrameReader(response)
                frames = [reader.next_frame(), reader.next_frame()]  # the first event, then a heartbeat
                self.assertEqual(frames[1], ": keep-alive\n\n")
                hold.set()
                text = "".join(frames) + reader.rest()
                self.assertIn("split", text)
                for block in text.split("\n\n")[:-1]:  # each one whole: a heartbeat alone, or an event
                    self.assertTrue(block == ": keep-alive" or block.startswith(("event:", "data:")), block)


class ClientConnectionsTest(ProxyTestCase):
    config_overrides = {"header_timeout": 0.5, "client_timeout": 0.8}

    def test_slowloris_is_cut_at_the_header_deadline_while_others_are_served(self):
        slow = self.raw_socket()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answered = b""
        for _ in range(40):  # the attacker trickles a header line every 50 ms, for at most 2 s
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            if select.select([slow], [], [], 0.05)[0]:
                answered = slow.recv(4096)
                break
            self.assertEqual(self.request("GET", "/healthz").status, 200)  # others are served meanwhile
        self.assertIn(b"408 Request Timeout", answered)
        self.assertIn(b"HEADER_TIMEOUT", answered)
        self.assertLess(time.monotonic() - started, 1.5)

    def test_a_large_unfinished_head_is_431_at_once_and_holds_no_thread(self):
        # The reproduction of issue 23: two 40 KB fields and a third begun, then a byte now and then.
        baseline = thread_count()
        sock = self.raw_socket()
        sock.sendall(b"POST /message HTTP/1.1\r\nA: " + b"a" * 40000 + b"\r\nB: " + b"b" * 40000 + b"\r\nC: ")
        started = time.monotonic()
        for _ in range(3):
            try:
                sock.send(b"c")
            except OSError:
                break
        answer = read_until_closed(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:100])
        self.assertIn(b"72 KiB", answer)
        self.assertLess(time.monotonic() - started, 1.0)  # at once: not after HEADER_TIMEOUT or CLIENT_TIMEOUT
        self.assertEqual(self.server.clients.busy, 0)  # no worker was given it
        self.assertLessEqual(thread_count(), baseline)

    def test_300_trickled_large_heads_hold_no_thread_while_healthz_is_answered(self):
        baseline = thread_count()
        sockets = [self.raw_socket() for _ in range(300)]
        for sock in sockets:  # 60 KiB first, under the limit: these wait for more, in the pool
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Fill: " + b"f" * 60000)
        self.assertTrue(wait_until(lambda: self.server.clients.waiting >= 300))
        for sock in sockets:  # then 20 KiB more, over it, without the blank line
            sock.sendall(b"f" * 20000)
        timed = []
        for _ in range(10):
            started = time.monotonic()
            self.assertEqual(self.request("GET", "/healthz").status, 200)
            timed.append(time.monotonic() - started)
            self.assertLessEqual(self.server.clients.busy, 1)  # the heads hold no worker; this check at most
            self.assertLessEqual(thread_count(), baseline)
        answers = [read_until_closed(sock) for sock in sockets]
        self.assertEqual({answer[:13] for answer in answers}, {b"HTTP/1.1 431 "})
        self.assertLess(max(timed), 1.0, timed)  # loose: a loaded machine; the bench times it tightly

    def test_pipelined_requests_are_answered_in_order(self):
        sock = self.raw_socket()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b'"not_found_error"}}' not in received:  # one reader for both: each response in full
            data = sock.recv(65536)
            self.assertTrue(data, f"connection closed after {received!r}")
            received += data
        first, second = received.index(b"HTTP/1.1 200 OK"), received.index(b"HTTP/1.1 404 Not Found")
        self.assertLess(first, second)
        self.assertIn(b'{"status":"ok"}', received[first:second])

    def test_empty_lines_before_a_request_line_are_ignored(self):
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", sock.recv(4096))
        # An old client's CRLF after a body, then its next request on the same connection.
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b\r\n" % (len(body), body))
        received = b""
        while b"event:done" not in received:
            data = sock.recv(65536)
            self.assertTrue(data, f"connection closed after {received!r}")
            received += data
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b'{"status":"ok"}' not in received:
            data = sock.recv(65536)
            self.assertTrue(data, "connection closed before the second health check")
            received += data
        self.assertIn(b"HTTP/1.1 200 OK", received)

    def test_idle_keep_alive_connections_are_closed(self):
        conn = self.connect()
        self.addCleanup(conn.close)
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        started = time.monotonic()
        self.assertEqual(conn.sock.recv(10), b"")  # the proxy closes it after CLIENT_TIMEOUT
        self.assertLess(time.monotonic() - started, 1.5)


class _ThreadRecordingHandler(proxy.ProxyHandler):
    """The proxy's handler, noting the thread that serves each request."""

    def route(self):
        self.server.served_on.append((self.path, threading.get_ident()))
        super().route()


class _ThreadRecorder(proxy.ProxyServer):
    def __init__(self, config):
        self.served_on = []
        super().__init__(config, _ThreadRecordingHandler)


class PerRequestCostTest(ProxyTestCase):
    """What each request does, kept small: one thread for a kept-alive connection's requests, the Date
    formatted once a second, the log written in batches, the request head read once."""

    server_class = _ThreadRecorder

    def test_a_kept_alive_connections_requests_are_served_by_one_thread_in_a_row(self):
        self.server.clients.NEXT_REQUEST_WAIT = 5.0  # a loaded machine's client may be slow to send the next
        # A JSON answer, as /v1/models is: one that comes whole with its head is written by the worker. A
        # stream's end is written by the relay loop, and its connection's next request waits for a worker.
        self.upstream.script = json_script({"object": "list", "data": []})
        conn = self.connect()
        self.addCleanup(conn.close)
        for index in range(6):
            response = self.request("GET", "/healthz" if index % 2 else "/v1/models", conn=conn)
            response.read()
            self.assertEqual(response.status, 200)
        self.assertEqual([path for path, _ in self.server.served_on], ["/v1/models", "/healthz"] * 3)
        self.assertEqual(len({thread for _, thread in self.server.served_on}), 1, self.server.served_on)
        conn.close()  # the client leaves: the worker closes the connection, and no thread is held for it
        self.assertTrue(wait_until(lambda: self.server.clients.busy == 0 and self.server.clients.waiting == 0))

    def test_a_connection_silent_past_the_wait_goes_back_to_the_pool_and_is_served_there_later(self):
        self.server.clients.NEXT_REQUEST_WAIT = 0.01
        conn = self.connect()
        self.addCleanup(conn.close)
        self.request("GET", "/v1/models", conn=conn).read()
        self.assertTrue(wait_until(lambda: self.server.clients.waiting == 1 and self.server.clients.busy == 0))
        response = self.request("GET", "/healthz", conn=conn)
        self.assertEqual((response.status, json.loads(response.read())["status"]), (200, "ok"))
        self.assertEqual([path for path, _ in self.server.served_on], ["/v1/models", "/healthz"])

    def test_the_date_header_is_formatted_once_a_second(self):
        proxy._http_date_of.cache_clear()
        started = time.time()
        dates = set()
        for _ in range(20):
            response = self.request("GET", "/healthz")
            response.read()
            dates.add(response.getheader("Date"))
        seconds = math.ceil(time.time() - started) + 1
        self.assertLessEqual(proxy._http_date_of.cache_info().misses, seconds)
        for date in dates:  # what email.utils would have written for that second
            when = email.utils.parsedate_to_datetime(date).timestamp()
            self.assertEqual(date, email.utils.formatdate(when, usegmt=True))
            self.assertLessEqual(abs(when - started), seconds + 1)

    def test_more_than_100_header_lines_or_http_2_are_refused(self):
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 100 + b"\r\n"
        self.assert_json_error(self.send_raw(head), 431, "100 header lines")
        self.assert_json_error(self.send_raw(b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n"), 505, "HTTP/1.1")
        response = self.send_raw(b"GET /healthz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        self.assertEqual((response.status, response.getheader("Connection")), (200, "keep-alive"))


class _CountedWrites(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


class LogWriterTest(unittest.TestCase):
    def test_every_record_is_written_in_order_in_batches_and_all_before_stop_returns(self):
        stream = _CountedWrites()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(proxy.TextLogFormatter(ECHO_SECRETS))
        records = queue.SimpleQueue()
        writer = proxy.LogWriter(records, handler)
        writer.start()
        for index in range(500):
            records.put(logging.LogRecord("proxy", logging.INFO, __file__, 1, "line %d %s", (index, ECHO_UPSTREAM_KEY),
                                          None))
        writer.stop()
        lines = stream.getvalue().splitlines()
        self.assertEqual([int(line.split()[4]) for line in lines], list(range(500)))
        self.assertTrue(all(ECHO_UPSTREAM_KEY not in line and " INFO line " in line for line in lines))
        self.assertLess(stream.writes, 50)  # one write a batch, not a line
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time()))[:13]  # logging's own time format
        self.assertTrue(lines[0].startswith(when), lines[0])

    def test_a_record_that_cannot_be_formatted_does_not_stop_the_log(self):
        stream = io.StringIO()
        records = queue.SimpleQueue()
        writer = proxy.LogWriter(records, logging.StreamHandler(stream))
        writer.start()
        records.put(logging.LogRecord("proxy", logging.INFO, __file__, 1, "%d", ("not a number",), None))
        records.put(logging.LogRecord("proxy", logging.INFO, __file__, 1, "still %s", ("here",), None))
        writer.stop()
        self.assertEqual(stream.getvalue().splitlines(),
                         ["INFO (a log line could not be formatted: TypeError)", "still here"])


class WorkerPoolTest(unittest.TestCase):
    def start_pool(self, minimum, maximum):
        pool = proxy.WorkerPool(minimum, maximum)
        pool.start()
        self.addCleanup(pool.close)
        return pool

    def test_it_grows_with_demand_to_its_maximum_and_queues_past_it(self):
        pool = self.start_pool(2, 5)
        self.assertEqual(pool.size, 2)
        release, started, done = threading.Event(), [], []
        self.addCleanup(release.set)

        def job(number):
            started.append(number)
            release.wait(10)
            done.append(number)
        for number in range(7):
            pool.submit(functools.partial(job, number))  # returns at once: no thread is started here
        self.assertTrue(wait_until(lambda: len(started) == 5), started)
        self.assertEqual(pool.size, 5)  # the maximum: the other two wait in the queue
        self.assertEqual(len(started), 5)
        release.set()
        self.assertTrue(wait_until(lambda: len(done) == 7), done)
        self.assertEqual(pool.size, 5)

    def test_idle_workers_end_down_to_the_minimum(self):
        before = thread_count()
        pool = self.start_pool(1, 4)
        pool.IDLE_TIMEOUT = 0.2
        release = threading.Event()
        self.addCleanup(release.set)
        for _ in range(4):
            pool.submit(lambda: release.wait(10))
        self.assertTrue(wait_until(lambda: pool.size == 4))
        release.set()
        self.assertTrue(wait_until(lambda: pool.size == 1, limit=5.0), pool.size)
        # the threads end, not just the count: one worker and the spawner are left
        self.assertTrue(wait_until(lambda: thread_count() <= before + 2), (before, thread_count()))

    def test_a_closed_pool_takes_no_job(self):
        pool = self.start_pool(1, 2)
        ran = threading.Event()
        self.assertTrue(pool.submit(ran.set))
        self.assertTrue(ran.wait(5))
        pool.close()
        self.assertFalse(pool.submit(lambda: None))  # the caller closes the connection instead

    def test_a_job_that_fails_keeps_its_worker(self):
        pool = self.start_pool(1, 1)
        ran = threading.Event()
        with self.assertLogs("proxy", "ERROR") as logs:
            pool.submit(lambda: 1 / 0)
            pool.submit(ran.set)
            self.assertTrue(ran.wait(5), "the one worker did not take the next job")
        self.assertIn("ZeroDivisionError", logs.output[0])
        self.assertEqual(pool.size, 1)


class _HeldWorkers(proxy.ProxyServer):
    """The proxy, its workers held before they take up a request until the test lets them."""

    def __init__(self, *args, **kwargs):
        self.go = threading.Event()
        super().__init__(*args, **kwargs)

    def serve_request(self, sock, client_address, read_ahead, at_once=False, door_pass=None):
        if not at_once:
            self.go.wait(10)
        super().serve_request(sock, client_address, read_ahead, at_once, door_pass)


class DoorTest(ProxyTestCase):
    """At the cap, refusals come from the connection thread at once, counting requests let in that still
    wait for a worker; a request whose body is still to come counts for nothing."""

    config_overrides = {"max_streams": 2, "cors_origins": ("https://app.example",)}
    server_class = _HeldWorkers

    def test_requests_waiting_for_a_worker_count_against_the_cap(self):
        self.addCleanup(self.server.go.set)
        self.upstream.script = lambda received: Script(steps=reply("x"))
        waiting = [self.raw_socket() for _ in range(2)]
        body = chat_body()
        for sock in waiting:  # each with its whole body: let in, then held before any worker takes it up
            sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        self.assertTrue(wait_until(lambda: self.server.clients.busy == 2))
        self.assertEqual(self.server.limits.active(), 0)  # no slot is taken yet
        started = time.monotonic()
        refused = self.send_raw(b"POST /message HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
                                b"Content-Length: %d\r\n\r\n%b" % (len(body), body))  # head and body in one write
        error = self.assert_json_error(refused, 503, "MAX_STREAMS")
        self.assertLess(time.monotonic() - started, 2.0)  # not after a worker: none is free to take it
        self.assertEqual(error["type"], "overloaded_error")
        self.assertEqual(refused.getheader("Retry-After"), "1")
        self.assertEqual(refused.getheader("Access-Control-Allow-Origin"), "https://app.example")
        self.server.go.set()
        for sock in waiting:
            self.assertIn(b"event:done", read_until_closed_or(sock, b"event:done"))
        self.assertEqual(len(self.upstream.requests), 2)
        self.assertRegex(self.request("GET", "/metrics").read().decode(),
                         r'proxy_rate_limit_rejections_total\{reason="streams"\} 1')

    def test_a_request_let_in_that_takes_no_slot_gives_its_place_back(self):
        self.server.go.set()
        self.upstream.script = lambda received: Script(steps=reply("x"))
        for _ in range(5):  # whole bodies, let in at the door, then refused by the handler: no slot taken
            self.assert_json_error(self.post_message(b'{"messages": []}'), 400, "'messages' is empty")
        for _ in range(2):  # had any place stayed taken, these would find the cap of 2 reached
            frames = parse_frames(self.post_message().read().decode())
            self.assertEqual(frames[-1][0], "done")

    def test_a_body_still_to_come_is_not_counted(self):
        self.server.go.set()
        self.upstream.script = lambda received: Script(steps=reply("x"))
        trickling = [self.raw_socket() for _ in range(3)]
        for sock in trickling:
            sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        self.assertTrue(wait_until(lambda: self.server.clients.busy == 3))
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(frames[-1][0], "done")


class ConnectionCapTest(ProxyTestCase):
    config_overrides = {"max_connections": 10}

    def test_at_the_cap_the_longest_idle_connection_makes_room(self):
        self.server.clients.EVICTION_GRACE = 0.0  # each idle one may go at once: this is about which goes first
        idle = [self.raw_socket() for _ in range(10)]
        self.assertTrue(wait_until(lambda: self.server.clients.waiting == 10))
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        idle[0].settimeout(2)
        self.assertEqual(idle[0].recv(10), b"")  # the oldest idle one was closed
        idle[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", idle[-1].recv(4096))  # the newest still works

    def test_a_connection_just_made_is_not_closed_for_another(self):
        self.server.clients.EVICTION_GRACE = 60.0  # all ten stay too fresh to close, however slow this machine is
        fresh = [self.raw_socket() for _ in range(10)]
        self.assertTrue(wait_until(lambda: self.server.clients.waiting == 10))
        response = self.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assert_json_error(response, 503, "MAX_CONNECTIONS")  # none has been silent for EVICTION_GRACE
        fresh[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", fresh[0].recv(4096))


class ManyIdleConnectionsTest(ProxyTestCase):
    COUNT = 5000

    def test_5000_idle_connections_hold_no_threads_and_others_are_served(self):
        try:
            import resource
        except ImportError:
            resource = None
        require(resource is not None, "the resource module (Unix) to allow 10,000 open files")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = 2 * self.COUNT + 200  # both ends of every connection live in this process
        require(hard == resource.RLIM_INFINITY or hard >= needed, f"an open-file limit of {needed}")
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        # These connections are all fresh; newcomers may close them for room at once (ConnectionCapTest
        # covers the grace that keeps a just-made connection from being closed).
        self.server.clients.EVICTION_GRACE = 0.0
        baseline = thread_count()
        sockets = []
        self.addCleanup(lambda: [sock.close() for sock in sockets])
        for _ in range(self.COUNT):
            sockets.append(socket.create_connection(("127.0.0.1", self.port), timeout=10))
        self.assertLessEqual(thread_count(), baseline + 2)
        started = time.monotonic()
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(frames[-1][0], "done")
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertLessEqual(thread_count(), baseline + 2)


class ConcurrencyTest(ProxyTestCase):
    def test_200_concurrent_streams_each_get_their_own_content(self):
        def script(received):
            name = received.json()["messages"][0]["content"]
            return Script(steps=[chunk(role="assistant", content="")]
                          + [step for i in range(5) for step in (chunk(content=f"{name}-{i}"), 0.01)]
                          + [chunk(finish="stop"), DONE])
        self.upstream.script = script
        results, errors = {}, []

        def client(number):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", "/message", body=chat_body(f"c{number}"))
                results[number] = parse_frames(conn.getresponse().read().decode())
                conn.close()
            except Exception as error:  # collected and reported below
                errors.append(f"client {number}: {error!r}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 200)
        for number, frames in results.items():
            self.assertEqual(self.contents(frames), [""] + [f"c{number}-{i}" for i in range(5)] + [""])
            self.assertEqual(frames[-1][0], "done")


# --------------------------------------------------------------------------
# Under load: keep-alive clients, slow bodies, the stream cap, the connection cap
# --------------------------------------------------------------------------

class KeepAliveLoadTest(ProxyTestCase):
    config_overrides = {"heartbeat_interval": 0.2}
    CLIENTS = 8
    SECONDS = 3.0  # about a thousand requests, each connection handed between the loop and a worker each time

    def script(self, received):
        body = received.body.decode()
        if "hold" in body:  # the stream a client leaves during the load
            return Script(steps=[chunk(role="assistant", content=""), HANG])
        if received.path.endswith("/chat/completions") and '"stream": false' in body:
            return json_completion()
        return Script(steps=reply("ok"))

    def keep_alive_client(self, number, until, times, errors):
        """One connection, requests back to back: /message and /v1, streamed and JSON, in turn."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        requests = (("/message", chat_body(), {}),
                    ("/v1/chat/completions", v1_chat(True), {"Content-Type": "application/json"}),
                    ("/v1/chat/completions", v1_chat(False), {"Content-Type": "application/json"}))
        try:
            turn = number
            while time.monotonic() < until:
                path, body, headers = requests[turn % len(requests)]
                turn += 1
                started = time.monotonic()
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                times.append(time.monotonic() - started)
                if response.status != 200 or response.will_close:
                    errors.append(f"client {number} {path}: {response.status} {data[:200]!r}")
                    return
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"client {number}: {error!r} after {len(times)} requests in all")
        finally:
            conn.close()

    def test_back_to_back_requests_never_stall_and_streams_stay_watched(self):
        self.upstream.script = self.script
        times, errors = [], []
        until = time.monotonic() + self.SECONDS
        clients = [threading.Thread(target=self.keep_alive_client, args=(n, until, times, errors))
                   for n in range(self.CLIENTS)]
        for client in clients:
            client.start()
        self.assertTrue(wait_until(lambda: len(times) >= 50, 5.0), f"only {len(times)} requests in 5 s")
        # Meanwhile a stream waits on a silent upstream: it gets heartbeats, and when
        # its client leaves, its upstream is closed at once.
        sock = self.raw_socket()
        body = chat_body("hold")
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        received = b""
        while received.count(b": keep-alive") < 3:
            data = sock.recv(4096)
            self.assertTrue(data, "the held stream ended")
            received += data
        sock.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0), "the upstream was not hung up on within 1 s")
        for client in clients:
            client.join(self.SECONDS + 10)
        self.assertEqual(errors, [])
        self.assertGreater(len(times), 200, "the clients hardly ran")
        slowest = max(times)
        self.assertLess(slowest, 0.5, f"the slowest of {len(times)} requests took {slowest:.3f} s; want < 0.5 s")


class SlowBodyTest(ProxyTestCase):
    config_overrides = {"max_streams": 2, "body_timeout": 1.5}

    def test_bodies_still_arriving_hold_no_stream_slot(self):
        self.upstream.script = lambda received: (json_script({"text": "heard"}) if "transcriptions" in received.path
                                                 else Script(steps=reply("quick")))
        trickling = []
        for _ in range(10):  # ten times MAX_STREAMS of /message bodies that have not arrived
            sock = self.raw_socket()
            sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
            trickling.append(sock)
        upload = self.raw_socket()  # and an upload, streamed to the upstream as it arrives
        first, rest = b"--b\r\n", b"x" * 32 + b"\r\n--b--\r\n"
        upload.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                       b"boundary=b\r\nContent-Length: %d\r\n\r\n%b" % (len(first + rest), first))
        self.assertTrue(wait_until(lambda: self.upstream.heads), "the upload never reached the upstream")
        for _ in range(3):
            frames = parse_frames(self.post_message().read().decode())
            self.assertEqual(self.contents(frames), ["", "quick", ""])
        # The upload's body completes: it takes its slot now, and is relayed.
        upload.sendall(rest)
        response = http.client.HTTPResponse(upload)
        response.begin()
        self.assertEqual((response.status, json.loads(response.read())), (200, {"text": "heard"}))
        # The trickling ones are bounded by BODY_TIMEOUT.
        response = http.client.HTTPResponse(trickling[0])
        response.begin()
        self.assert_json_error(response, 408, "BODY_TIMEOUT")


class _ServedByRecorder(proxy.ProxyServer):
    """The proxy, noting which thread serves each request: the pool's own, or a worker."""

    def __init__(self, *args, **kwargs):
        self.served_by = []
        super().__init__(*args, **kwargs)

    def serve_request(self, sock, client_address, read_ahead, *args):
        target = read_ahead.split(b" ", 2)[1].decode()
        self.served_by.append((target, threading.current_thread().name))
        super().serve_request(sock, client_address, read_ahead, *args)

    def at_the_door(self, address, head):
        verdict = super().at_the_door(address, head)
        if isinstance(verdict, bytes):  # a refusal made whole from the head, with no handler
            self.served_by.append((head.split(b" ", 2)[1].decode(), threading.current_thread().name))
        return verdict


class ConnectionFloodTest(ProxyTestCase):
    config_overrides = {"max_connections": 3, "header_timeout": 5.0}

    def mid_head(self):
        """Connections in the pool that sent part of a request head (the pool's own bookkeeping)."""
        return sum(1 for entry in list(self.server.clients._waiting.values()) if entry.head)

    def test_connections_mid_request_are_kept_and_newcomers_get_503(self):
        partial = [self.raw_socket() for _ in range(3)]
        for sock in partial:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        self.assertTrue(wait_until(lambda: self.mid_head() == 3))
        with self.assertLogs("proxy", "WARNING") as logs:
            for _ in range(5):
                response = self.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assert_json_error(response, 503, "MAX_CONNECTIONS")
                self.assertEqual(response.getheader("Retry-After"), "1")
        self.assertEqual(len(logs.records), 1, [r.getMessage() for r in logs.records])  # a flood is one line
        self.assertIn("1 new connection(s) got 503", logs.records[0].getMessage())
        for sock in partial:  # none of them was evicted
            sock.sendall(b"\r\n")
            self.assertIn(b"200 OK", sock.recv(4096))
        self.server.clients.EVICTION_GRACE = 0.0
        self.server.clients.EVICTION_PAUSE = 0.0  # the refusals' scans found none; this one looks again at once
        metrics = self.request("GET", "/metrics").read().decode()  # idle now: one makes room for this
        self.assertIn('proxy_rate_limit_rejections_total{reason="connections"} 5\n', metrics)


class SlowlorisLogTest(ProxyTestCase):
    config_overrides = {"header_timeout": 0.3}

    def time_out_heads(self, count):
        """count connections that start a head and never finish it, each answered 408."""
        slow = [self.raw_socket() for _ in range(count)]
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        for sock in slow:
            self.assertIn(b"408 Request Timeout", sock.recv(4096))

    def test_header_timeouts_are_counted_not_logged_one_by_one(self):
        with self.assertLogs("proxy", "INFO") as logs:
            self.time_out_heads(20)
        lines = [r.getMessage() for r in logs.records if "HEADER_TIMEOUT" in r.getMessage()]
        self.assertEqual(len(lines), 1, lines)

    def test_what_was_counted_is_logged_when_the_proxy_stops(self):
        with self.assertLogs("proxy", "INFO") as logs:
            self.time_out_heads(20)
            self.server.drain(1.0, threading.Event())  # well within the 10 s between two summaries
        counts = [int(record.getMessage().split(" ")[0]) for record in logs.records
                  if "HEADER_TIMEOUT" in record.getMessage()]
        self.assertEqual(sum(counts), 20, counts)  # 4,000 refusals were once logged as "1 connection(s)"


class TlsToPlainPortTest(ProxyTestCase):
    """A TLS client (an https:// or wss:// URL) on the plain-HTTP port is closed at once, with one warning a
    minute that says what to do; it never waits out HEADER_TIMEOUT for a 408."""

    def tls_handshake(self):
        """A real TLS client's handshake against the proxy: the seconds until it failed, and how."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = self.raw_socket()
        started = time.monotonic()
        with self.assertRaises((ssl.SSLError, ConnectionError)) as caught:
            context.wrap_socket(sock, server_hostname="127.0.0.1")
        return time.monotonic() - started, caught.exception

    def test_a_tls_client_is_closed_at_once_and_told_once_a_minute(self):
        with self.assertLogs("proxy", "WARNING") as logs:
            for _ in range(3):
                seconds, _ = self.tls_handshake()
                self.assertLess(seconds, 1.0)  # HEADER_TIMEOUT is 10 s
            self.assertTrue(self.server.wait_idle(2))
        lines = [record.getMessage() for record in logs.records if "TLS" in record.getMessage()]
        self.assertEqual(len(lines), 1, lines)  # the other two wait for the minute's count
        self.assertIn("1 connection(s) spoke TLS (an https:// or wss:// URL) to this plain-HTTP port", lines[0])
        self.assertIn("README.md, 'Behind nginx'", lines[0])
        self.assertEqual(self.request("GET", "/healthz").status, 200)  # and plain HTTP still works


class Http10ClientTest(ProxyTestCase):
    def test_http_1_0_client_gets_the_frames_unchunked_then_a_close(self):
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"POST /message HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        head, _, payload = received.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertIn(b"Connection: close", head)
        frames = parse_frames(payload.decode())
        self.assertEqual(self.contents(frames), ["", "Hello", " world", ""])
        self.assertEqual(frames[-1][0], "done")


class TlsUpstreamTest(unittest.TestCase):
    """The path every OpenAI user takes: an https:// upstream, verified against trusted CAs."""

    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        cert_file, key_file = os.path.join(folder.name, "cert.pem"), os.path.join(folder.name, "key.pem")
        with open(cert_file, "w") as out:
            out.write(TEST_CERT)
        with open(key_file, "w") as out:
            out.write(TEST_CERT_KEY)
        self.upstream = FakeUpstream(tls_files=(cert_file, key_file)).start()
        self.addCleanup(self.upstream.close)
        self.cert_file = cert_file

    def start_proxy(self, trust_cert):
        env = {"SSL_CERT_FILE": self.cert_file} if trust_cert else {"SSL_CERT_FILE": os.devnull}
        process = ProxyProcess("--base-url", self.upstream.base_url, env={"OA_API_KEY": TEST_KEY, **env})
        self.addCleanup(process.kill)
        return process

    def post(self, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", body=chat_body())
        return conn.getresponse()

    def test_streams_over_tls_and_hangs_up_when_the_client_leaves(self):
        process = self.start_proxy(trust_cert=True)
        frames = parse_frames(self.post(process.port).read().decode())
        self.assertEqual([d["content"] for e, d in frames if e == "message"], ["", "Hello", " world", ""])
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), HANG])
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        conn.request("POST", "/message", body=chat_body())
        FrameReader(conn.getresponse()).next_frame()
        conn.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0), "the TLS upstream was not hung up on within 1 s")

    def test_events_split_across_tls_records_pass_byte_for_byte(self):
        # Each step is one write, so one TLS record or more: an event cut in three records, then one of
        # 100 KB that spans seven (a record holds 16 KiB), whose bytes arrive with no new readiness event.
        first = chunk(role="assistant", content="")
        split = chunk(content="split")
        large = chunk(content="L" * 100000)
        steps = [first, split[:7], split[7:30], split[30:], large, chunk(finish="stop"), DONE]
        self.upstream.script = Script(steps=steps)
        process = self.start_proxy(trust_cert=True)
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=v1_chat(True), headers={"Content-Type": "application/json"})
        self.assertEqual(conn.getresponse().read(), b"".join(steps))

    def test_a_new_connection_resumes_the_tls_session(self):
        process = self.start_proxy(trust_cert=True)
        self.upstream.script = in_turn(Script(headers={"Content-Type": "text/event-stream", "Connection": "close"},
                                              steps=reply("one")), Script(steps=reply("two")))
        for want in ("one", "two"):
            frames = parse_frames(self.post(process.port).read().decode())
            self.assertEqual("".join(d["content"] for e, d in frames if e == "message"), want)
        self.assertEqual(self.upstream.tls_resumed, [False, True])

    def test_untrusted_certificate_is_502_not_a_silent_downgrade(self):
        process = self.start_proxy(trust_cert=False)
        response = self.post(process.port)
        body = json.loads(response.read())
        self.assertEqual(response.status, 502)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", body["error"]["message"])


# --------------------------------------------------------------------------
# /v1 passthrough
# --------------------------------------------------------------------------

class EventSplitterTest(unittest.TestCase):
    def split(self, pieces):
        splitter = proxy.EventSplitter()
        return [b"".join(splitter.feed(piece)) for piece in pieces], splitter.rest()

    def test_each_event_separately(self):
        splitter = proxy.EventSplitter()
        self.assertEqual(splitter.feed(b": ping\n\ndata: a\r\n\r\ndata: b\n\ndata: c"),
                         [b": ping\n\n", b"data: a\r\n\r\n", b"data: b\n\n"])

    def test_whole_events_out_as_soon_as_they_end(self):
        cases = [([b"data: x\n\n"], [b"data: x\n\n"], b""),
                 ([b"data: x\n", b"\n"], [b"", b"data: x\n\n"], b""),
                 ([b"data: x\r\n\r\ndata: y"], [b"data: x\r\n\r\n"], b"data: y"),
                 ([b"data: x\r\ndata: y\r\n"], [b""], b"data: x\r\ndata: y\r\n"),  # CRLF is one line end
                 ([b"data: x\r", b"\n\r", b"\n"], [b"", b"", b"data: x\r\n\r\n"], b""),
                 ([b"data: x\r\r"], [b""], b"data: x\r\r"),  # the last CR may begin a CRLF: wait
                 ([b"data: x\r\r", b"data: y\n\n"], [b"", b"data: x\r\rdata: y\n\n"], b""),
                 ([b": ping\n\ndata: a\n\ndata: b\n\n"], [b": ping\n\ndata: a\n\ndata: b\n\n"], b"")]
        for pieces, want, rest in cases:
            with self.subTest(pieces=pieces):
                self.assertEqual(self.split(pieces), (want, rest))

    def test_an_event_that_never_ends_is_an_error_at_the_cap(self):
        splitter = proxy.EventSplitter(max_event_bytes=4096)
        self.assertEqual(splitter.feed(b"data: a\n\n" + b"x" * 4000), [b"data: a\n\n"])
        with self.assertRaisesRegex(proxy.UpstreamBadResponse, "more than 4096 bytes"):
            for _ in range(10):
                splitter.feed(b"y" * 50)

    def test_bytes_are_untouched_whatever_the_split(self):
        stream = b"".join(reply("caf\u00e9", "b")) + b": c\r\n\r\nevent: e\rdata: 1\r\r"
        for size in (1, 2, 3, 7, 64):
            with self.subTest(size=size):
                outputs, rest = self.split([stream[i:i + size] for i in range(0, len(stream), size)])
                self.assertEqual(b"".join(outputs) + rest, stream)
                self.assertIn(rest, (b"", b"event: e\rdata: 1\r\r"))  # a final CR may begin a CRLF


class PassthroughTest(ProxyTestCase):
    def test_streamed_chat_completion_is_relayed_byte_for_byte(self):
        body = (b": OPENROUTER PROCESSING\n\n" + chunk(role="assistant", content="")
                + chunk(content="caf\u00e9") + b"data:{\"odd\": true}\r\n\r\n" + DONE)
        self.upstream.script = Script(steps=[body[i:i + 7] for i in range(0, len(body), 7)])
        request = json.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        response = self.request("POST", "/v1/chat/completions?trace=1", request.encode(),
                                {"Content-Type": "application/json"})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertEqual(response.getheader("X-Accel-Buffering"), "no")
        self.assertEqual(response.read(), body)
        received = self.upstream.requests[0]
        self.assertEqual((received.method, received.path), ("POST", "/v1/chat/completions?trace=1"))
        # The proxy asks for usage on the client's behalf (and strips the usage chunk again: see UsageTest).
        self.assertEqual(received.json(), {**json.loads(request), "stream_options": {"include_usage": True}})

    def test_each_event_is_relayed_at_once(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(content="first"), hold, DONE])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        first = response.read1(65536)
        arrived = time.monotonic()
        self.assertIn(b'"first"', first)
        self.assertFalse(hold.is_set())
        self.assertLess(arrived - self.upstream.sent_at[0], 0.2)
        hold.set()
        self.assertEqual(response.read(), DONE)

    def test_methods_paths_queries_and_json_bodies(self):
        cases = [("GET", "/v1/models?limit=2&order=asc", None), ("DELETE", "/v1/files/file-abc123", None),
                 ("POST", "/v1/embeddings", b'{"model": "text-embedding-3-small", "input": "hi"}'),
                 ("POST", "/v1/moderations", b'{"input": "hi"}'),
                 ("POST", "/v1/responses", b'{"model": "gpt-4o-mini", "input": "hi"}')]
        for method, path, body in cases:
            with self.subTest(method=method, path=path):
                self.upstream.script = json_script({"object": "list", "path": path})
                response = self.request(method, path, body)
                self.assertEqual((response.status, json.loads(response.read())["path"]), (200, path))
                received = self.upstream.requests[-1]
                self.assertEqual((received.method, received.path, received.body), (method, path, body or b""))

    def test_binary_and_multipart_bodies_pass_untouched(self):
        audio = bytes(range(256)) * 400
        boundary = "----proxytest7d9"
        upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
                  f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n"
                  f"Content-Type: audio/mpeg\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
        self.upstream.script = Script(headers={"Content-Type": "audio/mpeg"}, body=audio)
        response = self.request("POST", "/v1/audio/transcriptions", upload,
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        self.assertEqual(response.read(), audio)
        self.assertEqual(response.getheader("Content-Type"), "audio/mpeg")
        self.assertEqual(response.getheader("Content-Length"), str(len(audio)))
        received = self.upstream.requests[0]
        self.assertEqual(received.body, upload)
        self.assertEqual(received.headers["Content-Type"], f"multipart/form-data; boundary={boundary}")

    def test_headers_each_way(self):
        self.upstream.script = json_script({"ok": True}, headers={
            "x-request-id": "req_123", "openai-processing-ms": "42", "x-ratelimit-remaining-requests": "99",
            "retry-after": "1", "Keep-Alive": "timeout=5", "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "secret", "Set-Cookie": "__cf_bm=abc", "Server": "cloudflare",
            "Access-Control-Allow-Origin": "https://openai.example"})
        response = self.request("POST", "/v1/chat/completions", b"{}", {
            "Authorization": "Bearer client-key", "Cookie": "session=1", "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "x", "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic x",
            "Upgrade": "h2c", "OpenAI-Organization": "org-1", "OpenAI-Project": "proj_1",
            "Idempotency-Key": "idem-1", "X-Stainless-Lang": "python", "Content-Type": "application/json",
            "Host": "evil.example"})
        response.read()
        sent = self.upstream.requests[0].headers
        self.assertEqual(sent["Authorization"], f"Bearer {TEST_KEY}")
        self.assertEqual(sent["Host"], self.upstream.base_url.split("/")[2])
        for name in ("Cookie", "X-Client-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
            self.assertIsNone(sent[name], name)
        self.assertNotIn("keep-alive", (sent["Connection"] or "").lower())
        for name, value in (("OpenAI-Organization", "org-1"), ("OpenAI-Project", "proj_1"),
                            ("Idempotency-Key", "idem-1"), ("X-Stainless-Lang", "python"),
                            ("Content-Type", "application/json")):
            self.assertEqual(sent[name], value)
        for name, value in (("x-request-id", "req_123"), ("openai-processing-ms", "42"),
                            ("x-ratelimit-remaining-requests", "99"), ("retry-after", "1")):
            self.assertEqual(response.getheader(name), value)
        for name in ("Keep-Alive", "X-Upstream-Hop", "Set-Cookie"):
            self.assertIsNone(response.getheader(name), name)
        self.assertEqual(response.getheader("Server"), f"proxy.py/{proxy.__version__}")
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")

    def test_upstream_errors_keep_their_status_and_body(self):
        for status, extra in ((400, {}), (404, {}), (429, {"Retry-After": "20"}), (500, {}), (503, {})):
            with self.subTest(status=status):
                error = {"error": {"message": f"upstream says {status}", "type": "x", "param": None, "code": None}}
                self.upstream.script = json_script(error, status=status, headers=extra)
                response = self.request("POST", "/v1/chat/completions", b"{}")
                self.assertEqual((response.status, json.loads(response.read())), (status, error))
                if extra:
                    self.assertEqual(response.getheader("Retry-After"), "20")

    def test_upstream_auth_failure_is_502_without_key_material(self):
        for status in (401, 403):
            with self.subTest(status=status):
                self.upstream.script = json_script({"error": {"message": f"Incorrect API key: {TEST_KEY[-6:]}"}},
                                                   status=status)
                response = self.request("GET", "/v1/models")
                raw = response.read()
                self.assertEqual(response.status, 502)
                self.assertNotIn(TEST_KEY[-6:].encode(), raw)
                self.assertIn(b"refused the proxy's API key", raw)
                self.assertEqual(response.getheader("x-should-retry"), "false")

    def test_wrong_method_and_bare_prefix(self):
        response = self.request("PUT", "/v1/models")
        self.assert_json_error(response, 405)
        self.assertEqual(response.getheader("Allow"), "DELETE, GET, POST, OPTIONS")
        self.assert_json_error(self.request("GET", "/v1"), 404)

    def test_upload_over_the_limit_is_413_without_reading(self):
        response = self.send_raw(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 999999999\r\n\r\n")
        self.assert_json_error(response, 413, "MAX_UPLOAD_BYTES")
        self.assertEqual(self.upstream.requests, [])

    def test_upload_that_stalls_is_408(self):
        self.server.config = dataclasses.replace(self.config, body_timeout=0.5)
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inp")
        response = http.client.HTTPResponse(sock)
        response.begin()
        self.assert_json_error(response, 408, "did not arrive")


class PassthroughStreamingTest(ProxyTestCase):
    config_overrides = {"heartbeat_interval": 0.2, "idle_timeout": 2.0}

    def test_heartbeats_go_between_whole_events_even_while_one_is_half_sent(self):
        mid_event, between = threading.Event(), threading.Event()
        self.addCleanup(mid_event.set)
        self.addCleanup(between.set)
        self.upstream.script = Script(steps=[b'data: {"a":', mid_event, b'1}\n\n', between, DONE])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        received = b""
        while received.count(b": keep-alive\n\n") < 2:  # the upstream is in the middle of an event
            data = response.read1(65536)
            self.assertTrue(data, "stream ended early")
            received += data
        self.assertEqual(received.replace(b": keep-alive\n\n", b""), b"")  # no part of the event yet
        mid_event.set()
        while b'data: {"a":1}\n\n' not in received:
            data = response.read1(65536)
            self.assertTrue(data, "stream ended early")
            received += data
        between.set()
        received += response.read()
        self.assertEqual(received.replace(b": keep-alive\n\n", b""), b'data: {"a":1}\n\n' + DONE)

    def test_an_event_stream_of_known_length_goes_on_chunked_with_heartbeats_between_events(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        body = chunk(content="a") + DONE
        self.upstream.script = Script(headers={"Content-Type": "text/event-stream", "Content-Length": str(len(body))},
                                      steps=[chunk(content="a"), hold, DONE])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        self.assertIsNone(response.getheader("Content-Length"))  # its events may be masked: their length may change
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        received = response.read1(65536)
        while b": keep-alive\n\n" not in received:  # the upstream holds back its next event: a heartbeat
            data = response.read1(65536)
            self.assertTrue(data, "stream ended early")
            received += data
        hold.set()
        received += response.read()
        self.assertEqual(received.replace(b": keep-alive\n\n", b""), body)

    def test_client_leaving_a_stream_closes_the_upstream(self):
        self.upstream.script = Script(steps=[chunk(content="a"), HANG])
        sock = self.raw_socket()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIn(b"200 OK", sock.recv(65536))
        sock.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0))

    def test_client_leaving_a_non_streamed_request_closes_the_upstream(self):
        self.upstream.script = Script(hold_headers=True)
        sock = self.raw_socket()
        body = b'{"model": "o3", "input": "think hard"}'
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        self.assertTrue(wait_until(lambda: self.upstream.requests), "the request never reached the upstream")
        self.assertEqual(self.upstream.requests[0].body, body)
        sock.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0))

    def test_stream_breaking_between_events_ends_with_an_error_event(self):
        self.upstream.script = Script(steps=[chunk(content="a"), ABORT])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        body = response.read()  # a clean chunked end
        self.assertTrue(body.startswith(chunk(content="a")))
        error = json.loads(body[len(chunk(content="a")):].decode().removeprefix("data: "))["error"]
        self.assertEqual(error["type"], "upstream_error")

    def test_connection_breaking_inside_an_event_drops_the_half_event_and_says_so(self):
        self.upstream.script = Script(steps=[chunk(content="a"), b'data: {"choices": [', ABORT])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        body = response.read()  # a clean chunked end
        self.assertTrue(body.startswith(chunk(content="a") + b'data: {"error":'), body)
        self.assertNotIn(b'"choices": [', body[len(chunk(content="a")):])

    def test_an_event_that_never_ends_gets_an_error_event_at_16_mib(self):
        piece = b"x" * (1024 * 1024)
        self.upstream.script = Script(steps=[b"data: {\"a\": 1}\n\n", b"data: "] + [piece] * 17)
        response = self.request("POST", "/v1/chat/completions", v1_chat(True), {"Content-Type": "application/json"})
        body = response.read()
        self.assertLess(len(body), 1000, f"{len(body)} bytes relayed")  # the unfinished event is dropped
        self.assertTrue(body.startswith(b"data: {\"a\": 1}\n\n"), body[:100])
        self.assertIn(b'data: {"error"', body)
        self.assertIn(b"more than 16777216 bytes", body)

    def test_clean_end_after_an_unfinished_event_relays_its_bytes_as_they_are(self):
        self.upstream.script = Script(steps=[chunk(content="a"), b"data: [DONE]\n"])
        response = self.request("POST", "/v1/chat/completions", b'{"stream": true}')
        self.assertEqual(response.read(), chunk(content="a") + b"data: [DONE]\n")

    def test_sized_body_cut_short_is_not_passed_off_as_complete(self):
        self.upstream.script = Script(headers={"Content-Type": "application/json", "Content-Length": "1000"},
                                      steps=[b'{"partial": ', ABORT])
        response = self.request("GET", "/v1/models")
        with self.assertRaises(http.client.IncompleteRead):
            response.read()


class PathSafetyTest(ProxyTestCase):
    def test_requests_can_only_reach_the_configured_upstream(self):
        attempts = [b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                    b"GET /v1/../message HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /v1/models/%2e%2e/%2E%2E/admin HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /v1/./models HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\n\r\n"]
        for attempt in attempts:
            with self.subTest(attempt=attempt):
                self.assert_json_error(self.send_raw(attempt), 400)
        self.assertEqual(self.upstream.requests, [])

    def test_encoded_separators_and_dot_segments_are_refused(self):
        for path in ("/v1/%2E%2E%2F%2E%2E%2Fdecoy", "/v1/..%2f..%2fdecoy", "/v1//host/v1/models",
                     "/v1/models/..\\..\\decoy", "/v1/models%2F..%2Fadmin", "/v1/models/%5C%5Cdecoy",
                     "/v1/models/%2e", "/v1/files//content"):
            with self.subTest(path=path):
                head = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
                self.assert_json_error(self.send_raw(head), 400, "path")
        self.assertEqual(self.upstream.requests, [])

    def test_odd_paths_stay_on_the_upstream_host(self):
        for path in ("/@evil.example/x", "/models/", "/files/file-1/content?purpose=a%2Fb"):
            with self.subTest(path=path):
                self.upstream.script = json_script({})
                response = self.request("GET", "/v1" + path, headers={"Host": "evil.example"})
                response.read()
                self.assertEqual(response.status, 200)  # served by the fake upstream, nothing else
                self.assertEqual(self.upstream.requests[-1].path, "/v1" + path)


class UpstreamShapeTest(ProxyTestCase):
    def test_base_url_with_a_path_prefix(self):
        root = self.upstream.base_url[:-len("/v1")]
        for base, want in ((root + "/openai/v1", "/openai/v1/chat/completions"),
                           (root, "/chat/completions"), (root + "/api/v1/", "/api/v1/chat/completions")):
            with self.subTest(base=base):
                config = proxy.load_config(["--base-url", base], {"OA_API_KEY": TEST_KEY})
                self.server.config = dataclasses.replace(self.config, base_url=config.base_url)
                self.request("POST", "/v1/chat/completions", b"{}").read()
                self.assertEqual(self.upstream.requests[-1].path, want)

    def test_auth_header_and_extra_headers(self):
        config = proxy.load_config([], {"OA_API_KEY": TEST_KEY, "OA_AUTH_HEADER": "api-key", "OA_EXTRA_HEADERS":
                                        '{"HTTP-Referer": "https://app.example", "X-Title": "My App"}'})
        self.server.config = dataclasses.replace(self.config, auth_header=config.auth_header,
                                                 extra_headers=config.extra_headers)
        self.request("GET", "/v1/models", headers={"API-KEY": "client-key", "x-title": "client title",
                                                   "Authorization": "Bearer client-key"}).read()
        self.post_message().read()
        for sent in (r.headers for r in self.upstream.requests):  # the proxy's win, whatever the client's case
            self.assertEqual(sent.get_all("api-key"), [TEST_KEY])
            self.assertIsNone(sent["Authorization"])
            self.assertEqual(sent["HTTP-Referer"], "https://app.example")
            self.assertEqual(sent.get_all("X-Title"), ["My App"])

    def test_http_proxy_from_the_environment(self):
        # The fake upstream plays the forward proxy; the upstream's own name is never resolved.
        self.server.config = dataclasses.replace(self.config, base_url="http://api.example.test/openai/v1")
        saved = {name: os.environ.pop(name, None) for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")}
        os.environ["HTTP_PROXY"] = f"http://user:pa%20ss@127.0.0.1:{self.upstream.server.server_address[1]}"
        try:
            for _ in range(2):
                response = self.request("GET", "/v1/models?limit=2")
                response.read()
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value
        self.assertEqual(response.status, 200)
        sent = self.upstream.requests[-1]
        self.assertEqual(sent.path, "http://api.example.test/openai/v1/models?limit=2")
        self.assertEqual(sent.headers["Host"], "api.example.test")
        self.assertEqual(sent.headers["Proxy-Authorization"], "Basic " + base64.b64encode(b"user:pa ss").decode())
        self.assertEqual(sent.headers["Authorization"], f"Bearer {TEST_KEY}")
        self.assertEqual(len(self.upstream.connections), 1)  # the connection to the forward proxy is kept too

    def test_bad_auth_and_extra_header_settings(self):
        for env in ({"OA_AUTH_HEADER": "bad header"}, {"OA_EXTRA_HEADERS": "X-Title: x"},
                    {"OA_EXTRA_HEADERS": '{"X-A": "line\\nbreak"}'}, {"OA_EXTRA_HEADERS": '{"X-A": 1}'}):
            with self.subTest(env=env), self.assertRaises(proxy.ConfigError):
                proxy.load_config([], {"OA_API_KEY": "k", **env})


# --------------------------------------------------------------------------
# Upstream connections kept alive
# --------------------------------------------------------------------------

STALE_LINE = "had been closed by the upstream"


class UpstreamKeepAliveTest(ProxyTestCase):
    """Kept-alive upstream connections: reused, never carrying anything over, closed whenever in doubt."""

    def upstream_pool(self):
        return self.server.upstreams.connector(proxy.configured_upstreams(self.server.config)[0]).pool

    def message(self, text="Hi"):
        response = self.post_message(chat_body(text))
        frames = parse_frames(response.read().decode())
        self.assertTrue(self.server.wait_idle(5))  # its connection is back once the handler is done with it
        return response.status, "".join(self.contents(frames))

    def models(self, headers=None):
        response = self.request("GET", "/v1/models", headers=headers)
        response.read()
        self.assertTrue(self.server.wait_idle(5))
        return response.status

    def hold_stream(self, release):
        """A /message stream the upstream ends when `release` is set; returns its thread."""
        count = len(self.upstream.requests)
        thread = threading.Thread(target=lambda: self.post_message().read())
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(release.set)
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) > count))
        return thread

    def test_sequential_requests_share_one_connection(self):
        self.upstream.script = lambda received: (json_script({"data": []}) if received.path.endswith("/models")
                                                 else Script(steps=reply("Hi")))
        with self.assertLogs("proxy", "INFO") as logs:
            for _ in range(3):
                self.assertEqual(self.message(), (200, "Hi"))
                self.assertEqual(self.models(), 200)
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(len(self.upstream.connections), 1)
        self.assertEqual({received.port for received in self.upstream.requests}, set(self.upstream.connections))
        access = [record.getMessage() for record in logs.records if hasattr(record, "access")]
        self.assertEqual([line.rpartition(" ")[2] for line in access], ["reused=no"] + ["reused=yes"] * 5)
        counts = self.server.upstreams.connection_counts(self.server.config)
        primary = (("upstream", "primary"),)
        self.assertEqual((counts[("proxy_upstream_connections_opened_total", primary)],
                          counts[("proxy_upstream_connections_reused_total", primary)],
                          counts[("proxy_upstream_idle_connections", primary)]), (1, 5, 1))

    def test_the_most_recently_returned_connection_goes_first(self):
        first, second = threading.Event(), threading.Event()
        held = [Script(steps=[chunk(role="assistant", content=""), event] + reply("x")[1:]) for event in (first, second)]
        self.upstream.script = in_turn(*held, Script(steps=reply("Hi")))
        threads = [self.hold_stream(first), self.hold_stream(second)]
        ports = [received.port for received in self.upstream.requests]
        for event, thread, idle in ((first, threads[0], 1), (second, threads[1], 2)):
            event.set()
            thread.join(10)
            self.assertTrue(wait_until(lambda: self.upstream_pool().idle() == idle))
        self.assertEqual(self.message(), (200, "Hi"))
        self.assertEqual(self.upstream.requests[-1].port, ports[1])
        self.assertEqual(len(self.upstream.connections), 2)

    def test_nothing_of_one_request_reaches_the_next_on_its_connection(self):
        self.upstream.script = json_script({"data": []})
        self.assertEqual(self.models({"X-Private": "alice-only", "OpenAI-Organization": "org-a",
                                      "Authorization": "Bearer client-a"}), 200)
        self.assertEqual(self.models({"OpenAI-Organization": "org-b"}), 200)
        first, second = self.upstream.requests
        self.assertEqual(first.port, second.port)
        self.assertEqual(first.headers["X-Private"], "alice-only")
        self.assertIsNone(second.headers["X-Private"])
        self.assertEqual(second.headers.get_all("OpenAI-Organization"), ["org-b"])
        for received in (first, second):
            self.assertEqual(received.headers.get_all("Authorization"), [f"Bearer {TEST_KEY}"])

    def test_a_connection_the_client_left_is_closed_not_reused(self):
        self.upstream.script = in_turn(Script(steps=[chunk(role="assistant", content=""), chunk(content="a"), HANG]),
                                       Script(steps=reply("Hi")))
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        received = b""
        while b'"content":"a"' not in received:
            data = sock.recv(4096)
            self.assertTrue(data, "stream ended early")
            received += data
        sock.close()
        self.assertTrue(self.upstream.disconnected.wait(1.0), "the upstream was not hung up on within 1 s")
        self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(self.message(), (200, "Hi"))
        self.assertEqual(len(self.upstream.connections), 2)

    def test_a_connection_the_upstream_closed_while_idle_is_not_used(self):
        self.upstream.script = in_turn(Script(steps=reply("one"), close_after=True), Script(steps=reply("two")))
        self.assertEqual(self.message(), (200, "one"))
        self.assertTrue(wait_until(lambda: self.upstream.closed))
        with self.assertLogs("proxy", "DEBUG") as logs:
            self.assertEqual(self.message(), (200, "two"))
            self.assertTrue(self.server.wait_idle(5))
        self.assertFalse([line for line in logs.output if STALE_LINE in line])
        self.assertEqual(len(self.upstream.connections), 2)
        self.assertEqual(len(self.upstream.requests), 2)

    def test_a_reused_connection_closed_under_the_request_is_retried_once_on_a_new_one(self):
        self.assertEqual(self.config.retries, 0)
        for route in ("/message", "/v1"):
            with self.subTest(route=route):
                self.upstream.script = in_turn(Script(steps=reply("one")), Script(hang_up=True),
                                               Script(steps=reply("two")))
                self.assertEqual(self.message(), (200, "one"))
                with self.assertLogs("proxy", "DEBUG") as logs:
                    if route == "/message":
                        self.assertEqual(self.message(), (200, "two"))
                    else:
                        self.assertEqual(self.models(), 200)
                self.assertTrue([line for line in logs.output if STALE_LINE in line])
        self.upstream.script = Script(hang_up=True)  # on a new connection it is the upstream's failure: a 502
        self.upstream_pool().close()
        with self.assertLogs("proxy", "WARNING"):
            self.assert_json_error(self.post_message(), 502)

    def test_connection_close_from_the_upstream_is_honoured(self):
        self.upstream.script = in_turn(Script(headers={"Content-Type": "text/event-stream", "Connection": "close"},
                                              steps=reply("one")), Script(steps=reply("two")))
        self.assertEqual(self.message(), (200, "one"))
        with self.assertLogs("proxy", "DEBUG") as logs:
            self.assertEqual(self.message(), (200, "two"))
        self.assertFalse([line for line in logs.output if STALE_LINE in line])
        self.assertEqual(len(self.upstream.connections), 2)

    def test_failures_are_followed_by_good_requests_on_new_connections(self):
        error_event = (b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
        start = [chunk(role="assistant", content="")]
        failures = (("/v1/chat/completions", Script(steps=start + [ABORT])),  # a body broken off
                    ("/v1/chat/completions", Script(steps=start + [error_event, DONE])),  # an error mid-stream
                    ("/message", Script(steps=start + [error_event, DONE])),
                    ("/v1/chat/completions", Script(steps=start + [1.0])))  # silent past IDLE_TIMEOUT
        self.server.config = dataclasses.replace(self.config, idle_timeout=0.3)
        for number, (path, failure) in enumerate(failures, start=1):
            with self.subTest(path=path, failure=number):
                self.upstream.script = in_turn(failure, Script(steps=reply("Hi")))
                response = self.request("POST", path, v1_chat(True), {"Content-Type": "application/json"})
                try:
                    response.read()
                except http.client.IncompleteRead:
                    pass  # the broken body, left incomplete
                self.assertTrue(self.server.wait_idle(5))
                self.assertEqual(self.message(), (200, "Hi"))
                self.assertEqual(len(self.upstream.connections), number + 1)  # the failed one was not kept
        self.upstream.script = in_turn(json_script({"error": {"message": "nope", "type": "invalid_request_error"}},
                                                   status=400), Script(steps=reply("Hi")))
        self.assertEqual(self.post_message().status, 400)  # an error answer read to its end: kept
        self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(self.message(), (200, "Hi"))
        self.assertEqual(len(self.upstream.connections), len(failures) + 1)

    def test_idle_connections_are_closed_after_the_keepalive_timeout(self):
        self.server.config = dataclasses.replace(self.config, upstream_keepalive_timeout=1.0)
        self.assertEqual(self.message(), (200, "Hello world"))
        self.assertEqual(self.upstream_pool().idle(), 1)
        self.assertTrue(wait_until(lambda: self.upstream.closed, 5), "the idle connection was never closed")
        self.assertEqual(self.upstream_pool().idle(), 0)

    def test_no_more_than_upstream_keepalive_are_kept(self):
        for keep, want_idle in ((1, 1), (0, 0)):
            with self.subTest(keep=keep):
                self.server.config = dataclasses.replace(self.config, upstream_keepalive=keep)
                self.upstream_pool().close()
                first, second = threading.Event(), threading.Event()
                self.upstream.script = in_turn(*[Script(steps=[chunk(role="assistant", content=""), event]
                                                        + reply("x")[1:]) for event in (first, second)],
                                               Script(steps=reply("Hi")))
                threads = [self.hold_stream(first), self.hold_stream(second)]
                first.set()
                second.set()
                for thread in threads:
                    thread.join(10)
                self.assertTrue(self.server.wait_idle(5))
                self.assertEqual(self.upstream_pool().idle(), want_idle)


class PassthroughMemoryTest(unittest.TestCase):
    """100 MB each way through a real proxy process must not grow it by 100 MB."""

    SIZE = 100 * 1024 * 1024

    def test_large_bodies_stream_through_in_constant_memory(self):
        status_file = "/proc/%d/status"
        require(os.path.exists(status_file % os.getpid()), "/proc (Linux) to read a process's peak memory")
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        block = bytes(range(256)) * 4096  # 1 MiB
        upstream.script = Script(headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(self.SIZE)}, steps=[block] * 100)
        process = ProxyProcess("--base-url", upstream.base_url, "--max-upload-bytes", str(2 * self.SIZE),
                               env={"OA_API_KEY": TEST_KEY})
        self.addCleanup(process.kill)

        def peak_kib():
            with open(status_file % process.process.pid) as status:
                return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))

        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
        self.addCleanup(conn.close)
        conn.request("GET", "/v1/files/file-big/content")
        conn.getresponse().read()  # warm up: imports and first-request allocations
        before = peak_kib()
        conn.request("GET", "/v1/files/file-big/content")
        response = conn.getresponse()
        received = 0
        while True:
            data = response.read(1 << 20)
            if not data:
                break
            received += len(data)
        self.assertEqual(received, self.SIZE)
        upstream.script = json_script({"id": "file-up"})
        upload = iter([block] * 100)
        conn.request("POST", "/v1/files", body=upload,
                     headers={"Content-Length": str(self.SIZE), "Content-Type": "application/octet-stream"})
        self.assertEqual(conn.getresponse().read(), b'{"id": "file-up"}')
        self.assertEqual(len(upstream.requests[-1].body), self.SIZE)
        growth_mib = (peak_kib() - before) / 1024
        self.assertLess(growth_mib, 20, f"the proxy's peak memory grew by {growth_mib:.1f} MiB")


# --------------------------------------------------------------------------
# Real clients: the official openai SDKs (test-only installs)
# --------------------------------------------------------------------------

def responses_events(words):
    """A Responses API stream as OpenAI sends it: named events with type and sequence_number."""
    response = {"id": "resp_1", "object": "response", "created_at": CREATED, "model": "gpt-4o-mini",
                "status": "in_progress", "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": []}
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "".join(words), "annotations": []}]}
    events = [("response.created", {"response": response})]
    events += [("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                               "delta": word}) for word in words]
    events.append(("response.completed", {"response": {
        **response, "status": "completed", "output": [message],
        "usage": {"input_tokens": 3, "output_tokens": len(words), "total_tokens": 3 + len(words),
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}}}}))
    return [f"event: {name}\ndata: ".encode()
            + json.dumps({"type": name, "sequence_number": number, **payload}).encode() + b"\n\n"
            for number, (name, payload) in enumerate(events)]


def openai_like(received):
    """The fake upstream as the SDK tests need it: a few OpenAI endpoints."""
    path = received.path.partition("?")[0]
    request = received.json() if received.body else {}
    if path == "/v1/chat/completions" and request.get("stream"):
        include_usage = (request.get("stream_options") or {}).get("include_usage", False)
        return Script(steps=reply("Hello", " world", usage=include_usage))
    if path == "/v1/chat/completions":
        return json_script({"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED,
                            "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                "role": "assistant", "content": "Hello world"}}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    if path == "/v1/responses" and request.get("stream"):
        return Script(steps=responses_events(["Hello", " world"]))
    if path == "/v1/models":
        return json_script({"object": "list", "data": [
            {"id": name, "object": "model", "created": CREATED, "owned_by": "openai"}
            for name in ("gpt-4o-mini", "text-embedding-3-small")]})
    if path == "/v1/embeddings":
        vector = [0.25, -0.5, 1.0]
        encoded = (base64.b64encode(struct.pack("<3f", *vector)).decode()
                   if request.get("encoding_format") == "base64" else vector)
        return json_script({"object": "list", "model": request.get("model"), "data": [
            {"object": "embedding", "index": 0, "embedding": encoded}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    return json_script({"error": {"message": f"no fake for {path}", "type": "invalid_request_error"}}, status=404)


class PythonSdkTest(ProxyTestCase):
    """openai-python with base_url at the proxy, the proxy in front of the fake upstream."""

    def setUp(self):
        require(openai is not None, "the openai Python package")
        super().setUp()
        self.upstream.script = openai_like
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key="client-key", max_retries=0,
                                    http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(self.client.close)

    def assert_key_swapped(self):
        for received in self.upstream.requests:
            self.assertEqual(received.headers["Authorization"], f"Bearer {TEST_KEY}")

    def test_streamed_chat_completion_with_usage(self):
        stream = self.client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
            stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for part in stream:
            if part.choices:
                text += part.choices[0].delta.content or ""
            usage = part.usage or usage
        self.assertEqual(text, "Hello world")
        self.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (3, 2, 5))
        self.assert_key_swapped()

    def test_async_streamed_chat_completion(self):
        async def run():
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key="client-key", max_retries=0,
                                        http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
            async with client:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                    stream=True, stream_options={"include_usage": True})
                text, usage = "", None
                async for part in stream:
                    if part.choices:
                        text += part.choices[0].delta.content or ""
                    usage = part.usage or usage
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
                return text, usage, completion
        text, usage, completion = asyncio.run(run())
        self.assertEqual(text, "Hello world")
        self.assertEqual(usage.total_tokens, 5)
        self.assertEqual(completion.choices[0].message.content, "Hello world")

    def test_chat_completion_without_streaming(self):
        completion = self.client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual(completion.choices[0].message.content, "Hello world")
        self.assertEqual(completion.usage.total_tokens, 5)

    def test_streamed_responses(self):
        stream = self.client.responses.create(model="gpt-4o-mini", input="Hi", stream=True)
        events = list(stream)
        self.assertEqual([event.type for event in events], ["response.created", "response.output_text.delta",
                                                             "response.output_text.delta", "response.completed"])
        self.assertEqual("".join(e.delta for e in events if e.type == "response.output_text.delta"), "Hello world")
        self.assertEqual(events[-1].response.output_text, "Hello world")
        self.assertEqual(events[-1].response.usage.total_tokens, 5)

    def test_models_and_embeddings(self):
        self.assertEqual([model.id for model in self.client.models.list()],
                         ["gpt-4o-mini", "text-embedding-3-small"])
        embedding = self.client.embeddings.create(model="text-embedding-3-small", input="hi")
        self.assertEqual(embedding.data[0].embedding, [0.25, -0.5, 1.0])
        self.assert_key_swapped()

    def test_rate_limit_raises_rate_limit_error(self):
        self.upstream.script = json_script({"error": {"message": "Rate limit reached for gpt-4o-mini",
                                                      "type": "requests", "code": "rate_limit_exceeded"}},
                                           status=429, headers={"Retry-After": "1"})
        with self.assertRaises(openai.RateLimitError) as caught:
            self.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        self.assertIn("Rate limit reached", str(caught.exception))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_a_refused_upstream_key_is_not_retried_by_the_sdk(self):
        self.upstream.script = json_script({"error": {"message": "Incorrect API key"}}, status=401)
        client = openai.OpenAI(base_url=self.base_url, api_key="client-key", max_retries=2,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(client.close)
        with self.assertLogs("proxy", "WARNING"):
            with self.assertRaises(openai.InternalServerError) as caught:
                client.models.list()
            self.assertTrue(self.server.wait_idle(5))  # the warning comes with the access line, after the reply
        self.assertIn("must fix --api-key", str(caught.exception))
        self.assertEqual(len(self.upstream.requests), 1)  # x-should-retry: false, obeyed: no retries

    def test_bad_request_raises_bad_request_error_with_the_upstream_message(self):
        self.upstream.script = json_script({"error": {"message": "Invalid value for 'temperature'",
                                                      "type": "invalid_request_error", "param": "temperature",
                                                      "code": "invalid_value"}}, status=400)
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(model="gpt-4o-mini", temperature=9,
                                                messages=[{"role": "user", "content": "Hi"}])
        self.assertIn("Invalid value for 'temperature'", str(caught.exception))
        self.assertEqual(caught.exception.body["param"], "temperature")


NODE_STREAM_SCRIPT = """
const OpenAI = require('openai');
(async () => {
  const client = new OpenAI({ baseURL: process.env.PROXY_URL, apiKey: 'client-key', maxRetries: 0 });
  const stream = await client.chat.completions.create({
    model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Hi' }],
    stream: true, stream_options: { include_usage: true } });
  let text = '';
  let usage = null;
  for await (const part of stream) {
    if (part.choices.length) text += part.choices[0].delta.content || '';
    if (part.usage) usage = part.usage;
  }
  console.log(JSON.stringify({ text, usage }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def start_demo_proxy(test, **config):
    """A proxy in front of the --demo upstream, both stopped when the test ends; the proxy's port."""
    demo = proxy.DemoUpstream(word_delay=0.001)
    demo.start()
    test.addCleanup(demo.close)
    server = proxy.ProxyServer(make_config(base_url=demo.base_url, api_key="demo-key-not-secret", **config))
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    test.addCleanup(server.close)
    test.addCleanup(server.shutdown)
    return server.server_port


class DemoBacklogTest(unittest.TestCase):
    def test_a_burst_of_connections_waits_in_the_kernel_not_refused(self):
        demo = proxy.DemoUpstream()  # listening, not accepting yet: every connection waits in the backlog
        port = int(demo.base_url.split(":")[2].split("/")[0])
        socks = []
        try:
            for _ in range(300):  # 500 Realtime sessions at once had 27-131 wait 30 s on a backlog of 5
                sock = socket.socket()
                socks.append(sock)
                sock.settimeout(0.9)  # a dropped SYN is sent again after 1 s
                sock.connect(("127.0.0.1", port))
        finally:
            demo.start()
            for sock in socks:
                sock.close()
            demo.close()


class DemoSdkTest(unittest.TestCase):
    """openai-python against the proxy in --demo mode: the Responses API works with no key, as chat does."""

    def setUp(self):
        require(openai is not None, "the openai Python package")
        port = start_demo_proxy(self)  # the base URL and key as --demo sets them
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                    max_retries=0, http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(self.client.close)

    def test_streamed_responses_have_openais_event_sequence(self):
        words = ["Streams ", "word ", "by ", "word"]
        stream = self.client.responses.create(model="gpt-4o-mini", input="".join(words), stream=True)
        events = list(stream)
        self.assertEqual([event.type for event in events],
                         ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added"] + ["response.output_text.delta"] * len(words)
                         + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                            "response.completed"])
        self.assertEqual([event.sequence_number for event in events], list(range(len(events))))
        self.assertEqual([e.delta for e in events if e.type == "response.output_text.delta"], words)
        completed = events[-1].response
        self.assertEqual((completed.status, completed.output_text), ("completed", "".join(words)))
        self.assertEqual(completed.usage.total_tokens, 2 * len(words))

    def test_whole_response_from_input_items(self):
        response = self.client.responses.create(model="gpt-4o-mini", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "from input items"}]}])
        self.assertEqual((response.status, response.output_text), ("completed", "from input items"))
        self.assertEqual(response.usage.output_tokens, 3)

    def test_chat_still_streams(self):
        stream = self.client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                     messages=[{"role": "user", "content": "chat too"}])
        self.assertEqual("".join(part.choices[0].delta.content or "" for part in stream if part.choices), "chat too")


class NodeSdkTest(ProxyTestCase):
    """The openai npm package, run by node, streaming through the proxy."""

    def test_streamed_chat_completion(self):
        node_modules = os.environ.get("PROXY_TEST_NODE_MODULES", "")
        require(shutil.which("node") and os.path.isdir(os.path.join(node_modules, "openai")),
                "node and the openai npm package (PROXY_TEST_NODE_MODULES)")
        self.upstream.script = openai_like
        result = subprocess.run(["node", "-e", NODE_STREAM_SCRIPT], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "NODE_PATH": node_modules,
                                     "PROXY_URL": f"http://127.0.0.1:{self.port}/v1"})
        self.assertEqual(result.returncode, 0, result.stderr)
        output = json.loads(result.stdout)
        self.assertEqual(output["text"], "Hello world")
        self.assertEqual(output["usage"]["total_tokens"], 5)
        self.assertEqual(self.upstream.requests[0].headers["Authorization"], f"Bearer {TEST_KEY}")


# --------------------------------------------------------------------------
# The Realtime API: a WebSocket relay
# --------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3


def ws_xor(payload, key):
    """payload XOR the 4-byte key repeated (RFC 6455, 5.3), as one big-integer operation."""
    count = len(payload)
    if not count or key == bytes(4):
        return bytes(payload)
    keys = (key * (count // 4 + 1))[:count]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(count, "little")


def ws_frame(opcode, payload, masked, fin=True, rsv=0, declared=None, key=None):
    """One WebSocket frame, written from RFC 6455 5.2 here, apart from the proxy's own encoder; a masked one
    with a random key, or `key` (four zero bytes leave the payload as it is: fast for large ones)."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    key = key or os.urandom(4)
    return head + key + ws_xor(payload, key)


class WSPeer:
    """One end of a WebSocket in the tests: the client (its frames masked) or the fake upstream."""

    def __init__(self, sock, rfile, client):
        self.sock, self.rfile, self.client = sock, rfile, client

    def send(self, opcode, payload, **options):
        self.sock.sendall(ws_frame(opcode, payload, self.client, **options))

    def send_json(self, value):
        self.send(0x1, json.dumps(value).encode())

    def recv_frame(self, timeout=5):
        """(fin, opcode, payload) of the next frame; None when the connection ends first."""
        self.sock.settimeout(timeout)
        try:
            head = self.rfile.read(2)
            if len(head) < 2:
                return None
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            key = self.rfile.read(4) if head[1] & 0x80 else None
            payload = self.rfile.read(length)
        except (ConnectionError, OSError):
            return None
        if key is not None:
            payload = ws_xor(payload, key)
        return bool(head[0] & 0x80), head[0] & 0x0F, payload

    def recv_json(self, timeout=5):
        """The next text message, parsed; control frames on the way are skipped."""
        for _ in range(1000):
            frame = self.recv_frame(timeout)
            assert frame is not None, "the connection ended"
            if frame[1] == 0x1:
                return json.loads(frame[2])
        raise AssertionError("no text message")

    def recv_close(self, timeout=5):
        """(code, reason) of the close frame that comes before the end, skipping messages; None if none."""
        for _ in range(1000):
            frame = self.recv_frame(timeout)
            if frame is None:
                return None
            if frame[1] == 0x8:
                payload = frame[2]
                return (struct.unpack("!H", payload[:2])[0] if payload else 1005), payload[2:].decode()
        raise AssertionError("no close frame")

    def close(self):
        self.rfile.close()  # the socket's file object holds it open too
        self.sock.close()

    def ended_within(self, seconds):
        """True when the other side closes the connection within the time (frames before are read away);
        then this side closes too, as a client does, so that the proxy's linger ends at once."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.rfile.read1(65536):
                    break
            except socket.timeout:
                return False
            except OSError:
                break
        else:
            return False
        self.close()
        return True


def ws_accept(key):
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def read_head(rfile):
    """The status and headers (lower-cased names, lists of values) of an HTTP head, read line by line."""
    status_line = rfile.readline(65537).decode("latin-1")
    headers = {}
    for _ in range(200):
        line = rfile.readline(65537).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            break
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status_line, headers


class _FakeRealtimeHandler(socketserver.StreamRequestHandler):
    def handle(self):
        fake = self.server.fake
        request_line, headers = read_head(self.rfile)
        if not request_line:
            return
        fake.handshakes.append((request_line.split(" ")[1], headers))
        if fake.status != 101:
            body = fake.error_body
            self.wfile.write(b"HTTP/1.1 %d Nope\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (fake.status, len(body), body))
            return
        offered = [token.strip() for value in headers.get("sec-websocket-protocol", []) for token in value.split(",")]
        chosen = b"Sec-WebSocket-Protocol: realtime\r\n" if "realtime" in offered else b""
        accept = fake.accept or ws_accept(headers["sec-websocket-key"][0])
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: %s\r\nx-request-id: req_rt\r\n%s%s\r\n"
                         % (accept.encode(), chosen, fake.extra_head))
        peer = WSPeer(self.connection, self.rfile, client=False)
        fake.peers.put(peer)
        try:
            fake.session(peer)
        finally:
            fake.ended.put(time.monotonic())


def write_test_cert(test):
    """TEST_CERT and its key in files of a temporary folder: (cert file, key file)."""
    folder = tempfile.TemporaryDirectory()
    test.addCleanup(folder.cleanup)
    files = os.path.join(folder.name, "cert.pem"), os.path.join(folder.name, "key.pem")
    for path, text in zip(files, (TEST_CERT, TEST_CERT_KEY)):
        with open(path, "w") as out:
            out.write(text)
    return files


def tls_server_context(files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*files)
    return context


class _FakeRealtimeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    tls = None  # a server SSLContext: the upstream speaks wss://

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        sock.settimeout(5)
        try:
            return self.tls.wrap_socket(sock, server_side=True), address
        except (OSError, ssl.SSLError):
            sock.close()
            raise

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # the proxy hanging up is no error of the test's
            super().handle_error(request, client_address)


class FakeRealtime:
    """A scriptable WebSocket upstream: it records each handshake, answers it with 101 (or `status` and
    `error_body`), then runs `session(peer)`; `peers` and `ended` tell when each session starts and ends."""

    def __init__(self, tls_files=None):
        self.handshakes = []
        self.status, self.error_body, self.accept, self.extra_head = 101, b"", None, b""
        self.session = self.answer_each_text
        self.peers, self.ended = queue.Queue(), queue.Queue()
        self.server = _FakeRealtimeServer(("127.0.0.1", 0), _FakeRealtimeHandler)
        self.server.fake = self
        self.server.tls = tls_server_context(tls_files) if tls_files else None
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        scheme = "https" if tls_files else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer_each_text(peer, usage=None):
        """session.created, then each text message answered by a delta of its text and a response.done."""
        peer.send_json({"type": "session.created", "session": {"id": "sess_1"}})
        for _ in range(1000):
            frame = peer.recv_frame(timeout=30)
            if frame is None:
                return
            if frame[1] == 0x8:
                peer.send(0x8, frame[2])
                return
            if frame[1] == 0x9:
                peer.send(0xA, frame[2])
            if frame[1] == 0x1:
                text = json.loads(frame[2]).get("text", "")
                peer.send_json({"type": "response.output_text.delta", "delta": text})
                peer.send_json({"type": "response.done", "response": {"status": "completed", "usage": usage or {
                    "total_tokens": 7, "input_tokens": 3, "output_tokens": 4}}})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def open_websocket(test, port, path="/v1/realtime?model=gpt-realtime", headers=None, method="GET",
                   version="13", key=None):
    """A WebSocket handshake on a raw socket: (status line, headers, WSPeer); a 101 must answer the key."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    test.addCleanup(sock.close)
    key = key or base64.b64encode(os.urandom(16)).decode()
    fields = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": version, **(headers or {})}
    sock.sendall(f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in fields.items() if value is not None) + b"\r\n")
    rfile = sock.makefile("rb")
    test.addCleanup(rfile.close)
    status_line, head = read_head(rfile)
    if status_line.split(" ")[1] == "101":
        test.assertEqual(head["sec-websocket-accept"], [ws_accept(key)])
    return status_line, head, WSPeer(sock, rfile, client=True)


class RealtimeTestCase(ProxyTestCase):
    """A proxy in front of a FakeRealtime upstream."""

    def setUp(self):
        self.realtime = FakeRealtime()
        self.addCleanup(self.realtime.close)
        self.config = make_config(base_url=self.realtime.base_url, **self.config_overrides)
        self.server = self.server_class(self.config)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(self.stop_server)
        self.port = self.server.server_port

    def handshake(self, path="/v1/realtime?model=gpt-realtime", headers=None, method="GET", version="13",
                  key=None, port=None):
        """Open a WebSocket through the proxy (or what is in front of it, on port): (status line, headers,
        WSPeer)."""
        return open_websocket(self, port or self.port, path, headers, method, version, key)

    def open_session(self, **options):
        status_line, head, peer = self.handshake(**options)
        self.assertIn(" 101 ", status_line)
        upstream = self.realtime.peers.get(timeout=5)
        return peer, upstream, head

    def error_of(self, peer, head):
        """The JSON error of a refused handshake, its body read by Content-Length."""
        body = peer.rfile.read(int(head["content-length"][0]))
        self.assertEqual(head["content-type"], ["application/json"])
        return json.loads(body)["error"]

    def metric(self, name):
        body = self.request("GET", "/metrics").read().decode()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                if line.startswith(name)}


class RealtimeRelayTest(RealtimeTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),)}

    def test_text_round_trip_with_the_proxys_key_and_not_the_clients(self):
        with self.assertLogs("proxy", "INFO") as logs:
            peer, upstream, head = self.open_session(headers={"Authorization": f"Bearer {ALICE_KEY}",
                                                              "OpenAI-Beta": "realtime=v1"})
            self.assertEqual(peer.recv_json()["type"], "session.created")
            peer.send_json({"type": "conversation.item.create", "text": "hi there"})
            self.assertEqual(peer.recv_json(), {"type": "response.output_text.delta", "delta": "hi there"})
            self.assertEqual(peer.recv_json()["response"]["usage"]["total_tokens"], 7)
            peer.send(0x8, struct.pack("!H", 1000) + b"bye")
            self.assertEqual(peer.recv_close(), (1000, "bye"))
            self.assertTrue(peer.ended_within(3))
            self.server.wait_idle(5)
        path, headers = self.realtime.handshakes[0]
        self.assertEqual(path, "/v1/realtime?model=gpt-realtime")  # the query as the client sent it
        self.assertEqual(headers["authorization"], [f"Bearer {TEST_KEY}"])
        self.assertEqual(headers["openai-beta"], ["realtime=v1"])
        self.assertNotIn(ALICE_KEY, json.dumps(headers))
        self.assertNotIn("sec-websocket-extensions", headers)
        self.assertEqual(head["x-request-id"], ["req_rt"])
        line = next(line for line in logs.output if '"GET /v1/realtime"' in line)
        for part in (" 101 ", "client=alice", "model=gpt-realtime", "tokens=3/4", "session=client_closed",
                     "closed_by=client", "close_code=1000", "bytes_in="):
            self.assertIn(part, line)

    def test_a_browser_key_in_the_subprotocol_is_checked_and_never_forwarded(self):
        peer, upstream, head = self.open_session(headers={
            "Sec-WebSocket-Protocol": f"realtime, openai-insecure-api-key.{ALICE_KEY}, openai-beta.realtime-v1",
            "Origin": f"http://127.0.0.1:{self.port}"})
        self.assertEqual(head["sec-websocket-protocol"], ["realtime"])
        headers = self.realtime.handshakes[0][1]
        self.assertEqual(headers["sec-websocket-protocol"], ["realtime, openai-beta.realtime-v1"])
        self.assertEqual(headers["authorization"], [f"Bearer {TEST_KEY}"])
        self.assertNotIn(ALICE_KEY, json.dumps(headers))
        self.assertNotIn("origin", headers)

    def test_a_wrong_or_missing_key_is_refused_before_any_upstream_connection(self):
        for headers, said in (({}, "needs a client key"),
                              ({"Authorization": "Bearer wrong-key-0123456789"}, "'Authorization: Bearer <key>'"),
                              ({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.wrong-key-0123456789"},
                               "sent in the WebSocket subprotocol openai-insecure-api-key.<key> was not recognised")):
            status_line, head, peer = self.handshake(headers=headers)
            self.assertIn(" 401 ", status_line)
            error = self.error_of(peer, head)
            self.assertEqual(error["code"], "invalid_api_key")
            self.assertIn(said, error["message"])
            if "Sec-WebSocket-Protocol" in headers:  # told where it sent the key, not of a header it never sent
                self.assertNotIn("Authorization", error["message"])
        self.assertEqual(self.realtime.handshakes, [])

    def test_an_origin_not_allowed_is_refused(self):
        self.server.config = dataclasses.replace(self.config, cors_origins=("https://app.example",))
        status_line, head, peer = self.handshake(headers={"Authorization": f"Bearer {ALICE_KEY}",
                                                          "Origin": "https://evil.example"})
        self.assertIn(" 403 ", status_line)
        self.assertIn("CORS_ORIGINS", self.error_of(peer, head)["message"])
        self.assertEqual(self.realtime.handshakes, [])
        self.open_session(headers={"Authorization": f"Bearer {ALICE_KEY}", "Origin": "https://app.example"})

    def test_malformed_handshakes_are_answered_400(self):
        auth = {"Authorization": f"Bearer {ALICE_KEY}"}
        cases = [({"version": "8"}, "Sec-WebSocket-Version must be 13"),
                 ({"key": "not-base64!"}, "Sec-WebSocket-Key"),
                 ({"key": base64.b64encode(b"short").decode()}, "Sec-WebSocket-Key"),
                 ({"method": "POST", "headers": {**auth, "Content-Length": "0"}}, "GET"),
                 ({"headers": {**auth, "Connection": "keep-alive"}}, "Connection: Upgrade"),
                 ({"headers": {**auth, "Content-Length": "5"}}, "no body")]
        for options, message in cases:
            with self.subTest(options=options):
                options.setdefault("headers", auth)
                status_line, head, peer = self.handshake(**options)
                self.assertIn(" 400 ", status_line)
                self.assertIn(message, self.error_of(peer, head)["message"])
                if "version" in options:
                    self.assertEqual(head["sec-websocket-version"], ["13"])
        self.assertEqual(self.realtime.handshakes, [])

    def test_upstream_refusals_are_relayed_with_the_key_masked(self):
        echo = json.dumps({"error": {"message": f"Incorrect API key provided: {TEST_KEY}",
                                     "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
        for status, want in ((401, 502), (403, 502), (404, 404), (429, 429)):
            with self.subTest(status=status):
                self.realtime.status, self.realtime.error_body = status, echo
                status_line, head, peer = self.handshake(headers={"Authorization": f"Bearer {ALICE_KEY}"})
                self.assertIn(f" {want} ", status_line)
                body = peer.rfile.read(int(head["content-length"][0]))
                self.assertNotIn(TEST_KEY[4:12].encode(), body)
                self.assertIn(b"error", body)

    def test_an_unreachable_upstream_is_a_502_and_counts_for_its_breaker(self):
        self.server.config = dataclasses.replace(self.config, base_url=f"http://127.0.0.1:{free_port()}/v1",
                                                 breaker_threshold=1)
        with self.assertLogs("proxy", "WARNING"):
            status_line, head, peer = self.handshake(headers=bearer(ALICE_KEY))
        self.assertIn(" 502 ", status_line)
        self.assertIn("could not reach the upstream", self.error_of(peer, head)["message"])
        self.assertEqual(self.request("GET", "/healthz").status, 503)  # the breaker took it out
        status_line, head, peer = self.handshake(headers=bearer(ALICE_KEY))
        self.assertIn(" 503 ", status_line)
        self.assertIn("cool-down", self.error_of(peer, head)["message"])

    def test_client_departure_closes_the_upstream_within_a_second(self):
        peer, upstream, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(peer.recv_json()["type"], "session.created")
        left = time.monotonic()
        peer.close()
        ended = self.realtime.ended.get(timeout=5)
        self.assertLess(ended - left, 1.0)

    def test_upstream_departure_closes_the_client_with_1011(self):
        self.realtime.session = lambda peer: peer.send_json({"type": "session.created"})
        peer, upstream, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(peer.recv_json()["type"], "session.created")
        code, reason = peer.recv_close()
        self.assertEqual(code, 1011)
        self.assertIn("upstream", reason)
        self.assertTrue(peer.ended_within(3))

    def test_the_upstreams_own_close_code_reaches_the_client(self):
        def close_at_once(upstream_peer):
            upstream_peer.send(0x8, struct.pack("!H", 4000) + b"session expired")
            upstream_peer.recv_frame()
        self.realtime.session = close_at_once
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(peer.recv_close(), (4000, "session expired"))
        peer.send(0x8, struct.pack("!H", 4000))
        self.assertTrue(peer.ended_within(3))

    def test_a_close_frame_rfc_6455_forbids_ends_the_session_with_1002(self):
        for case, payload in (("one byte", b"\x03"), ("code 999", struct.pack("!H", 999)),
                              ("code 1005", struct.pack("!H", 1005)), ("code 5000", struct.pack("!H", 5000)),
                              ("reason not UTF-8", struct.pack("!H", 1000) + b"\xff\xfe")):
            with self.subTest(case=case):
                peer, upstream, _ = self.open_session(headers=bearer(ALICE_KEY))
                self.assertEqual(peer.recv_json()["type"], "session.created")
                peer.send(0x8, payload)
                code, reason = peer.recv_close()
                self.assertEqual(code, 1002)
                self.assertIn("close frame", reason)
                self.assertTrue(peer.ended_within(3))
                self.assertIsNotNone(self.realtime.ended.get(timeout=5))  # and the upstream's side ended too

    def test_a_forbidden_close_from_the_upstream_is_the_upstreams_fault(self):
        def bad_close(upstream_peer):
            upstream_peer.send(0x8, struct.pack("!H", 1006))
            upstream_peer.recv_frame()
        self.realtime.session = bad_close
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        code, reason = peer.recv_close()
        self.assertEqual(code, 1011)  # the client did nothing wrong
        self.assertIn("the upstream broke the protocol: a close frame with code 1006", reason)

    def test_fragments_with_control_frames_between_are_passed_on_as_one_message(self):
        def fragmented(upstream_peer):
            upstream_peer.send(0x1, b'{"type": "response.', fin=False)
            upstream_peer.send(0x9, b"ping-1")
            upstream_peer.send(0x0, b'output_text.delta", ', fin=False)
            upstream_peer.send(0x0, b'"delta": "x"}')
            upstream_peer.recv_frame(timeout=10)
        self.realtime.session = fragmented
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(peer.recv_frame(), (True, 0x9, b"ping-1"))
        self.assertEqual(peer.recv_frame(), (True, 0x1, b'{"type": "response.output_text.delta", "delta": "x"}'))

    def test_a_100_mb_frame_ends_the_session_with_1009_and_never_reaches_the_upstream(self):
        received = []
        self.realtime.session = lambda upstream_peer: received.append(upstream_peer.recv_frame(timeout=10))
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        peer.sock.sendall(ws_frame(0x2, b"", masked=True, declared=100 * 1024 * 1024) + b"x" * 65536)
        code, reason = peer.recv_close()
        self.assertEqual(code, 1009)
        self.assertIn("MAX_FRAME_BYTES", reason)
        self.realtime.ended.get(timeout=5)
        self.assertEqual(received[0][1], 0x8)  # a close, not the frame
        self.assertEqual(struct.unpack("!H", received[0][2][:2])[0], 1009)

    def test_an_upstream_message_over_the_bound_ends_the_session_with_1009(self):
        self.server.config = dataclasses.replace(self.config, max_frame_bytes=1000)
        received = []

        def too_big(upstream_peer):  # two fragments of 600 bytes: each within the bound, the message not
            upstream_peer.send(0x1, b"x" * 600, fin=False)
            upstream_peer.send(0x0, b"x" * 600)
            received.append(upstream_peer.recv_frame(timeout=10))
        self.realtime.session = too_big
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        code, reason = peer.recv_close()
        self.assertEqual(code, 1009)
        self.assertIn("the upstream sent a message over 1000 bytes (MAX_FRAME_BYTES)", reason)
        self.realtime.ended.get(timeout=5)
        self.assertEqual(received[0][1:], (0x8, struct.pack("!H", 1009) + reason.encode()[len("the upstream sent "):]))

    def test_protocol_errors_end_the_session(self):
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        peer.sock.sendall(ws_frame(0x1, b"{}", masked=False))  # a client frame must be masked
        self.assertEqual(peer.recv_close()[0], 1002)
        self.realtime.session = lambda upstream_peer: upstream_peer.sock.sendall(ws_frame(0x1, b"{}", masked=True))
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(peer.recv_close()[0], 1011)  # the upstream broke the protocol: not the client's fault

    def test_a_key_echoed_by_the_upstream_in_events_and_close_reasons_is_masked(self):
        def hostile(upstream_peer):
            upstream_peer.send_json({"type": "error", "error": {"message": f"bad key {TEST_KEY}"}})
            upstream_peer.send(0x1, f"plain text {TEST_KEY}".encode())
            upstream_peer.send(0x1, json.dumps({"type": "x", "error": {
                "message": TEST_KEY.replace("s", "\\u0073")}}).replace("\\\\", "\\").encode())
            half = len(TEST_KEY) // 2  # an error split across fragments, a ping between them
            upstream_peer.send(0x1, ('{"error": "' + TEST_KEY[:half]).encode(), fin=False)
            upstream_peer.send(0x9, TEST_KEY[:20].encode())
            upstream_peer.send(0x0, (TEST_KEY[half:] + '"}').encode())
            upstream_peer.send(0x2, b"\x00binary " + TEST_KEY.encode())
            upstream_peer.send(0x8, struct.pack("!H", 4001) + TEST_KEY.encode())
            upstream_peer.recv_frame()
        self.realtime.session = hostile
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        seen = b""
        for _ in range(7):
            frame = peer.recv_frame()
            self.assertIsNotNone(frame)
            seen += frame[2]
        for start in range(len(TEST_KEY) - 7):  # no 8 characters of it, anywhere
            self.assertNotIn(TEST_KEY[start:start + 8].encode(), seen)
        self.assertEqual(seen.count(b"[redacted]") >= 6, True, seen)

    def test_metrics_count_sessions_running_and_by_outcome(self):
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        self.assertEqual(self.metric("proxy_realtime_sessions ")["proxy_realtime_sessions"], 1)
        peer.send(0x8, struct.pack("!H", 1000))
        self.assertEqual(peer.recv_close()[0], 1000)
        self.assertTrue(peer.ended_within(3))
        self.server.wait_idle(5)
        values = self.metric("proxy_realtime_sessions")
        self.assertEqual(values["proxy_realtime_sessions"], 0)
        self.assertEqual(values['proxy_realtime_sessions_total{outcome="client_closed"}'], 1)


class RealtimeWordyKeyTest(RealtimeTestCase):
    """A client key that holds a subprotocol's name: the 101 still names the subprotocol the client offered."""

    KEY = "my-realtime-client-key-0001"  # holds "realtime", the subprotocol browsers offer
    config_overrides = {"proxy_api_keys": (("app", KEY),)}

    def test_a_websockets_client_with_its_key_in_a_subprotocol_gets_the_one_it_offered(self):
        require(websockets is not None, "websockets")
        from websockets.sync.client import connect
        with connect(f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime", open_timeout=5,
                     subprotocols=["realtime", f"openai-insecure-api-key.{self.KEY}"]) as client:
            self.assertEqual(client.subprotocol, "realtime")
            self.assertEqual(json.loads(client.recv(timeout=5))["type"], "session.created")
        self.assertEqual(self.realtime.handshakes[0][1]["sec-websocket-protocol"], ["realtime"])


class RealtimeSeveralKeysTest(RealtimeTestCase):
    """Realtime sessions take the upstream keys in turn, as requests do."""

    config_overrides = {"api_key": "rt-key-number-one-0001,rt-key-number-two-0002"}

    def test_sessions_take_the_keys_in_turn(self):
        for _ in range(4):
            peer, upstream, head = self.open_session()
            self.assertEqual(peer.recv_json()["type"], "session.created")
            peer.send(0x8, struct.pack("!H", 1000))
            self.assertEqual(peer.recv_close()[0], 1000)
        self.assertTrue(self.server.wait_idle(5))
        sent = [headers["authorization"][0] for _, headers in self.realtime.handshakes]
        self.assertEqual(sent, ["Bearer rt-key-number-one-0001", "Bearer rt-key-number-two-0002"] * 2)


class RealtimeRoutesTest(RealtimeTestCase):
    """/v1/realtime?model= picks its route like a request body's model; the alias replaces it in the query."""

    def setUp(self):
        super().setUp()
        self.server.config = with_routes(dataclasses.replace(self.config, base_url="http://127.0.0.1:9/v1"), [
            {"models": ["gpt-realtime*"], "upstreams": [{"url": self.realtime.base_url, "keys": "RT_KEYS",
                                                         "auth_header": "api-key", "model": "prod-realtime"}]}],
            {"RT_KEYS": "rt-routed-key-00000001"})

    def test_a_session_goes_to_its_models_route(self):
        peer, upstream, head = self.open_session(path="/v1/realtime?model=gpt-realtime-mini&x=1")
        self.assertEqual(peer.recv_json()["type"], "session.created")
        path, headers = self.realtime.handshakes[0]
        self.assertEqual(path, "/v1/realtime?model=prod-realtime&x=1")
        self.assertEqual(headers["api-key"], ["rt-routed-key-00000001"])
        self.assertNotIn("authorization", headers)


class RealtimeLimitsTest(RealtimeTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),), "token_budget_day": 10,
                        "max_streams_per_client": 1, "idle_timeout": 0.5}

    def test_a_session_holds_a_stream_slot(self):
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        status_line, head, second = self.handshake(headers=bearer(ALICE_KEY))
        self.assertIn(" 429 ", status_line)
        self.assertIn("MAX_STREAMS_PER_CLIENT", self.error_of(second, head)["message"])
        peer.send(0x8, struct.pack("!H", 1000))
        self.assertTrue(peer.ended_within(3))
        self.server.wait_idle(5)
        self.open_session(headers=bearer(ALICE_KEY))  # the slot came back

    def test_a_client_over_its_budget_mid_session_gets_a_close_frame_with_the_reason(self):
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        peer.recv_json()
        peer.send_json({"text": "one"})
        self.assertEqual(peer.recv_json()["type"], "response.output_text.delta")
        self.assertEqual(peer.recv_json()["type"], "response.done")  # 7 tokens: within 10
        peer.send_json({"text": "two"})
        self.assertEqual(peer.recv_json()["type"], "response.output_text.delta")
        self.assertEqual(peer.recv_json()["type"], "response.done")  # 14: over, and told so
        code, reason = peer.recv_close()
        self.assertEqual(code, 1008)
        self.assertIn("TOKEN_BUDGET_DAY", reason)
        self.assertTrue(peer.ended_within(3))
        self.realtime.ended.get(timeout=5)
        self.server.wait_idle(5)
        status_line, head, again = self.handshake(headers=bearer(ALICE_KEY))
        self.assertIn(" 429 ", status_line)
        self.assertEqual(self.error_of(again, head)["type"], "insufficient_quota")

    def test_an_idle_session_is_closed_and_pings_count_as_activity(self):
        peer, _, _ = self.open_session(headers=bearer(ALICE_KEY))
        peer.recv_json()
        for _ in range(4):  # 1.2 s of pings, each within the 0.5 s idle timeout
            time.sleep(0.3)
            peer.send(0x9, b"ping")
            self.assertEqual(peer.recv_frame(), (True, 0xA, b"ping"))
        started = time.monotonic()
        code, reason = peer.recv_close(timeout=5)
        self.assertEqual(code, 1001)
        self.assertIn("IDLE_TIMEOUT", reason)
        self.assertLess(time.monotonic() - started, 2)
        self.realtime.ended.get(timeout=5)


class RealtimeTokenRateTest(RealtimeTestCase):
    config_overrides = {"rate_limit_tpm": 10}

    def test_tokens_per_minute_count_as_they_arrive(self):
        peer, _, _ = self.open_session()
        peer.recv_json()
        for text in ("one", "two"):  # 7 tokens each: the second response puts the client over 10 a minute
            peer.send_json({"text": text})
            peer.recv_json()
            self.assertEqual(peer.recv_json()["type"], "response.done")
        code, reason = peer.recv_close()
        self.assertEqual(code, 1008)
        self.assertRegex(reason, r"^this client is over its RATE_LIMIT_TPM; retry in (\d+ s|1 min)$")


class RealtimeShutdownTest(RealtimeTestCase):
    def test_a_drain_that_times_out_sends_1001_going_away(self):
        peer, _, _ = self.open_session()
        peer.recv_json()
        force = threading.Event()
        threading.Thread(target=self.server.drain, args=(0.3, force), daemon=True).start()
        code, reason = peer.recv_close(timeout=5)
        self.assertEqual(code, 1001)
        self.assertIn("shutting down", reason)


class RealtimeSignalTest(unittest.TestCase):
    """The real process: SIGTERM lets sessions run for DRAIN_TIMEOUT, then sends them 1001, never a reset."""

    def test_sigterm_ends_open_sessions_with_1001_and_logs_them_in_json(self):
        realtime = FakeRealtime()
        self.addCleanup(realtime.close)
        process = ProxyProcess("--base-url", realtime.base_url, env={
            "OA_API_KEY": TEST_KEY, "DRAIN_TIMEOUT": "0.5", "LOG_FORMAT": "json", "PROXY_API_KEYS": f"alice={ALICE_KEY}"})
        self.addCleanup(process.kill)
        status_line, _, peer = open_websocket(self, process.port, headers=bearer(ALICE_KEY))
        self.assertIn(" 101 ", status_line)
        peer.send_json({"text": "before the signal"})
        self.assertEqual(peer.recv_json()["type"], "session.created")
        self.assertEqual(peer.recv_json()["delta"], "before the signal")
        peer.recv_json()
        process.signal(signal.SIGTERM)
        code, reason = peer.recv_close(timeout=10)
        self.assertEqual((code, reason), (1001, "the proxy is shutting down"))
        self.assertTrue(peer.ended_within(3))
        self.assertEqual(process.wait(), 0)
        process.lines.put(None)
        records = [json.loads(line) for line in process.log + list(iter(process.lines.get, None))]
        access = next(record for record in records if record.get("path") == "/v1/realtime")
        self.assertEqual({name: access[name] for name in ("status", "client", "model", "outcome", "closed_by",
                                                          "close_code", "prompt_tokens", "completion_tokens")},
                         {"status": 101, "client": "alice", "model": "gpt-realtime", "outcome": "shutdown",
                          "closed_by": "proxy", "close_code": 1001, "prompt_tokens": 3, "completion_tokens": 4})
        self.assertGreater(access["bytes_in"], 0)
        self.assertNotIn(ALICE_KEY, json.dumps(records))


class RealtimeMemoryTest(unittest.TestCase):
    """100 MiB each way through a session of a real proxy process must not grow it by 100 MiB: client
    frames pass as they arrive, and a server message is held only until its end (1 MiB here)."""

    def test_a_session_moves_100_mib_each_way_in_bounded_memory(self):
        status_file = "/proc/%d/status"
        require(os.path.exists(status_file % os.getpid()), "/proc (Linux) to read a process's peak memory")
        block = bytes(range(256)) * 4096  # 1 MiB
        audio_delta = json.dumps({"type": "response.output_audio.delta", "delta": base64.b64encode(
            block[:786000]).decode()}).encode()
        received = []

        def sink_then_send(upstream_peer):
            total = 0
            for _ in range(200):
                frame = upstream_peer.recv_frame(timeout=30)
                if frame is None or frame[1] not in (0x0, 0x2):
                    break
                total += len(frame[2])
                if total >= 100 * len(block):
                    break
            received.append(total)
            for _ in range(100):  # as the Realtime API sends audio: base64 in JSON events, here 1 MiB each
                upstream_peer.send(0x1, audio_delta)
            upstream_peer.recv_frame(timeout=30)
        realtime = FakeRealtime()
        self.addCleanup(realtime.close)
        process = ProxyProcess("--base-url", realtime.base_url, env={"OA_API_KEY": TEST_KEY})
        self.addCleanup(process.kill)

        def peak_kib():
            with open(status_file % process.process.pid) as status:
                return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))

        status_line, _, warm = open_websocket(self, process.port)  # imports and first-session allocations
        warm.send(0x8, struct.pack("!H", 1000))
        self.assertTrue(warm.ended_within(5))
        realtime.session = sink_then_send
        before = peak_kib()
        status_line, _, peer = open_websocket(self, process.port)
        for _ in range(100):  # frames pass on as they arrive: never held by the proxy
            peer.sock.sendall(ws_frame(0x2, block, True, key=bytes(4)))
        self.assertEqual(sum(len(peer.recv_frame(timeout=30)[2]) for _ in range(100)), 100 * len(audio_delta))
        self.assertEqual(received, [100 * len(block)])
        growth_mib = (peak_kib() - before) / 1024
        self.assertLess(growth_mib, 20, f"the proxy's peak memory grew by {growth_mib:.1f} MiB")


class RealtimeManySessionsTest(RealtimeTestCase):
    def test_200_idle_sessions_at_once_and_healthz_stays_fast(self):
        self.realtime.session = lambda upstream_peer: upstream_peer.recv_frame(timeout=60)
        peers = [self.open_session()[0] for _ in range(200)]
        self.assertEqual(self.metric("proxy_realtime_sessions ")["proxy_realtime_sessions"], 200)
        times = []
        for _ in range(5):
            started = time.monotonic()
            self.assertEqual(self.request("GET", "/healthz").status, 200)
            times.append(time.monotonic() - started)
        self.assertLess(max(times), 0.5, times)
        for peer in peers:
            peer.close()
        self.assertTrue(self.server.wait_idle(10))


def sdk_like_session(peer):
    """What the Realtime API does for a text conversation: the last user text, back as one delta."""
    peer.send_json({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_1"}})
    text = ""
    for _ in range(1000):
        frame = peer.recv_frame(timeout=30)
        if frame is None or frame[1] == 0x8:
            if frame is not None:
                peer.send(0x8, frame[2])
            return
        event = json.loads(frame[2]) if frame[1] == 0x1 else {}
        if event.get("type") == "conversation.item.create":
            text = event["item"]["content"][0]["text"]
        elif event.get("type") == "response.create":
            for word in re.findall(r"\S+\s*", text):
                peer.send_json({"type": "response.output_text.delta", "event_id": "event_2", "response_id": "r",
                                "item_id": "i", "output_index": 0, "content_index": 0, "delta": word})
            peer.send_json({"type": "response.done", "event_id": "event_3", "response": {
                "id": "r", "object": "realtime.response", "status": "completed", "output": [],
                "usage": {"total_tokens": 9, "input_tokens": 4, "output_tokens": 5}}})


def python_realtime_round_trip(base_url, key, text):
    """openai-python's client.realtime.connect() through the proxy: (text streamed back, usage)."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": text}]})
        connection.response.create()
        reply = ""
        for event in connection:
            if event.type == "response.output_text.delta":
                reply += event.delta
            if event.type == "response.done":
                return reply, event.response.usage
    raise AssertionError("the session ended before response.done")


class RealtimePythonSdkTest(RealtimeTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),)}

    def setUp(self):
        require(openai is not None and websockets is not None, "openai-python with its realtime extra")
        super().setUp()
        self.realtime.session = sdk_like_session

    def test_text_round_trip_through_client_realtime_connect(self):
        reply, usage = python_realtime_round_trip(f"http://127.0.0.1:{self.port}/v1", ALICE_KEY, "from python")
        self.assertEqual((reply, usage.total_tokens), ("from python", 9))
        path, headers = self.realtime.handshakes[0]
        self.assertEqual(path, "/v1/realtime?model=gpt-realtime")
        self.assertEqual(headers["authorization"], [f"Bearer {TEST_KEY}"])

    def test_a_wrong_key_raises_before_the_upstream_is_asked(self):
        with self.assertRaises(Exception) as caught:
            python_realtime_round_trip(f"http://127.0.0.1:{self.port}/v1", "wrong-key-0123456789", "x")
        self.assertIn("401", str(caught.exception))
        self.assertEqual(self.realtime.handshakes, [])


SDP_OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
SDP_ANSWER = "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


class RealtimeWebRtcPathTest(ProxyTestCase):
    """The WebRTC way into the Realtime API is plain HTTP under /v1, so it passes through as any call does:
    an ephemeral key minted with the proxy's key, and the SDP offer and answer."""

    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),)}

    def test_client_secrets_and_calls_through_openai_python(self):
        require(openai is not None, "the openai Python package")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=ALICE_KEY, max_retries=0,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(client.close)
        self.upstream.script = in_turn(
            json_script({"value": "ek_test_123", "expires_at": 1900000000,
                         "session": {"type": "realtime", "model": "gpt-realtime"}}),
            Script(status=201, headers={"Content-Type": "application/sdp", "Location": "/v1/realtime/calls/rtc_1"},
                   body=SDP_ANSWER.encode()))
        secret = client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-realtime"})
        self.assertEqual(secret.value, "ek_test_123")
        answer = client.realtime.calls.create(sdp=SDP_OFFER, session={"type": "realtime", "model": "gpt-realtime"})
        self.assertEqual(answer.content.decode(), SDP_ANSWER)
        minted, call = self.upstream.requests
        self.assertEqual((minted.method, minted.path), ("POST", "/v1/realtime/client_secrets"))
        self.assertEqual((call.method, call.path), ("POST", "/v1/realtime/calls"))
        self.assertIn(SDP_OFFER.encode(), call.body)
        for received in (minted, call):
            self.assertEqual(received.headers["Authorization"], f"Bearer {TEST_KEY}")

    def test_a_browsers_raw_sdp_offer(self):
        self.upstream.script = Script(status=201, headers={"Content-Type": "application/sdp",
                                                           "Location": "/v1/realtime/calls/rtc_1"},
                                      body=SDP_ANSWER.encode())
        response = self.request("POST", "/v1/realtime/calls?model=gpt-realtime", SDP_OFFER.encode(),
                                {**bearer(ALICE_KEY), "Content-Type": "application/sdp"})
        self.assertEqual((response.status, response.read().decode()), (201, SDP_ANSWER))
        self.assertEqual(response.getheader("Location"), "/v1/realtime/calls/rtc_1")
        received = self.upstream.requests[0]
        self.assertEqual((received.path, received.body), ("/v1/realtime/calls?model=gpt-realtime",
                                                          SDP_OFFER.encode()))
        self.assertEqual(received.headers["Authorization"], f"Bearer {TEST_KEY}")


class RealtimeDemoSdkTest(unittest.TestCase):
    """openai-python against --demo's Realtime session, through the real relay path."""

    def test_the_demo_answers_with_the_last_user_text(self):
        require(openai is not None and websockets is not None, "openai-python with its realtime extra")
        port = start_demo_proxy(self, demo=True)
        reply, usage = python_realtime_round_trip(f"http://127.0.0.1:{port}/v1", "unused",
                                                  "offline through the relay")
        self.assertEqual(reply, "offline through the relay")
        self.assertEqual((usage.input_tokens, usage.output_tokens, usage.total_tokens), (4, 4, 8))
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
            snippet = readme.read().split('The Realtime API over its WebSocket, in Python', 1)[1]
        snippet = re.search(r"```python\n(.*?)```", snippet, re.S).group(1)
        self.assertIn('base_url="http://localhost:8080/v1"', snippet)
        snippet = snippet.replace("localhost:8080", f"127.0.0.1:{port}")
        result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (0, "Hello over the Realtime API\n"), result.stderr)


NODE_REALTIME_SCRIPT = """
const OpenAI = require('openai');
const { OpenAIRealtimeWS } = require('openai/realtime/ws');
const client = new OpenAI({ baseURL: process.env.PROXY_URL, apiKey: process.env.CLIENT_KEY });
const rt = new OpenAIRealtimeWS({ model: 'gpt-realtime' }, client);
let text = '';
rt.socket.on('open', () => {
  rt.send({ type: 'conversation.item.create',
            item: { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'from node' }] } });
  rt.send({ type: 'response.create' });
});
rt.on('response.output_text.delta', (event) => { text += event.delta; });
rt.on('response.done', (event) => {
  console.log(JSON.stringify({ text, usage: event.response.usage, extensions: rt.socket.extensions }));
  rt.close();
});
rt.on('error', (error) => { console.error(error); process.exit(1); });
setTimeout(() => { console.error('no response.done within 20 s'); process.exit(2); }, 20000).unref();
"""


class RealtimeNodeSdkTest(RealtimeTestCase):
    """The openai npm package's OpenAIRealtimeWS (on the ws package, which offers compression)."""

    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),)}

    def run_node(self, port, key):
        """NODE_REALTIME_SCRIPT against the proxy on port, behind a TLS front: its JSON output."""
        node_modules = os.environ.get("PROXY_TEST_NODE_MODULES", "")
        require(shutil.which("node") and os.path.isdir(os.path.join(node_modules, "openai"))
                and os.path.isdir(os.path.join(node_modules, "ws")),
                "node with the openai and ws npm packages (PROXY_TEST_NODE_MODULES)")
        files = write_test_cert(self)
        front = TlsFront(self, port, files)
        result = subprocess.run(["node", "-e", NODE_REALTIME_SCRIPT], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "NODE_PATH": node_modules, "CLIENT_KEY": key,
                                     "NODE_EXTRA_CA_CERTS": files[0],
                                     "PROXY_URL": f"https://127.0.0.1:{front.port}/v1"})
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_against_the_demo(self):
        port = start_demo_proxy(self, demo=True)
        output = self.run_node(port, "unused")
        self.assertEqual((output["text"], output["usage"]["total_tokens"]), ("from node", 4))

    def test_text_round_trip_through_openai_realtime_ws(self):
        self.realtime.session = sdk_like_session
        output = self.run_node(self.port, ALICE_KEY)
        self.assertEqual((output["text"], output["usage"]["total_tokens"]), ("from node", 9))
        self.assertEqual(output["extensions"], "")  # offered by ws, not negotiated through the proxy
        headers = self.realtime.handshakes[0][1]
        self.assertEqual(headers["authorization"], [f"Bearer {TEST_KEY}"])
        self.assertNotIn("sec-websocket-extensions", headers)


class RealtimeTlsTestCase(RealtimeTestCase):
    """A proxy in front of a wss:// FakeRealtime, whose certificate it trusts."""

    def setUp(self):
        files = write_test_cert(self)
        self.realtime = FakeRealtime(tls_files=files)
        self.addCleanup(self.realtime.close)
        self.config = make_config(base_url=self.realtime.base_url)
        self.server = self.server_class(self.config)
        connector = self.server.upstreams.connector(proxy.configured_upstreams(self.config)[0])
        connector.context.load_verify_locations(files[0])  # as SSL_CERT_FILE would make the proxy trust it
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(self.stop_server)
        self.port = self.server.server_port


class RealtimeTlsUpstreamTest(RealtimeTlsTestCase):
    """A wss:// upstream: messages larger than a TLS record, each way, arrive whole and in order."""

    def test_large_messages_cross_a_tls_upstream_both_ways(self):
        peer, _, _ = self.open_session()
        self.assertEqual(peer.recv_json()["type"], "session.created")
        for size in (10, 40000, 300000):
            text = "".join(random.choice("abcdef") for _ in range(size))
            peer.send_json({"text": text})
            self.assertEqual(peer.recv_json(timeout=10)["delta"], text)
            self.assertEqual(peer.recv_json()["type"], "response.done")
        peer.send(0x8, struct.pack("!H", 1000))
        self.assertEqual(peer.recv_close()[0], 1000)


class Tunnel:
    """A loopback listener that joins each connection it accepts to `target`, bytes both ways; `front`
    is what is done with an accepted socket first (a TLS handshake, a CONNECT head), returning the
    socket to relay."""

    def __init__(self, test, target):
        self._target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        test.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def front(self, sock):
        return sock

    def _accept(self):
        for _ in range(100):
            try:
                sock, _ = self.listener.accept()
                front = self.front(sock)
            except (OSError, ssl.SSLError):
                return
            back = socket.create_connection(self._target)
            for source, target in ((front, back), (back, front)):
                threading.Thread(target=self.pump, args=(source, target), daemon=True).start()

    @staticmethod
    def pump(source, target):
        try:
            for _ in range(1000000):
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)  # the end passed on; the other pump closes target
        source.close()


class ConnectProxy(Tunnel):
    """A forward proxy that speaks CONNECT (as HTTPS_PROXY names one): it records each request head and
    tunnels every one to `target`, whatever host it names."""

    def __init__(self, test, target):
        self.heads = []
        super().__init__(test, target)

    def front(self, sock):
        rfile = sock.makefile("rb")
        self.heads.append(read_head(rfile))
        rfile.close()
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return sock


class TlsFront(Tunnel):
    """A TLS terminator in front of the proxy, as nginx or a load balancer is in production: the openai
    npm package opens the Realtime API on wss:// only."""

    def __init__(self, test, port, files):
        self._context = tls_server_context(files)
        super().__init__(test, ("127.0.0.1", port))

    def front(self, sock):
        return self._context.wrap_socket(sock, server_side=True)


class RealtimeForwardProxyTest(RealtimeTlsTestCase):
    """A wss:// upstream reached through HTTPS_PROXY's CONNECT tunnel, with its credentials."""

    def test_a_session_through_https_proxy(self):
        forward = ConnectProxy(self, self.realtime.server.server_address)
        saved = {name: os.environ.pop(name, None) for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")}
        os.environ["HTTPS_PROXY"] = f"http://user:secret-pass@127.0.0.1:{forward.port}"
        try:
            config = dataclasses.replace(self.config, base_url="https://api.example.test/v1")
            connector = self.server.upstreams.connector(proxy.configured_upstreams(config)[0])  # reads HTTPS_PROXY
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value
        connector.context.check_hostname = False  # the test certificate names 127.0.0.1, not api.example.test
        connector.context.verify_mode = ssl.CERT_NONE
        self.server.config = config
        peer, _, _ = self.open_session()
        self.assertEqual(peer.recv_json()["type"], "session.created")
        peer.send_json({"text": "tunnelled"})
        self.assertEqual(peer.recv_json()["delta"], "tunnelled")
        request_line, head = forward.heads[0]
        self.assertEqual(request_line.split(" ")[:2], ["CONNECT", "api.example.test:443"])
        self.assertEqual(head["proxy-authorization"], ["Basic " + base64.b64encode(b"user:secret-pass").decode()])
        path, headers = self.realtime.handshakes[0]
        self.assertEqual((path, headers["host"]), ("/v1/realtime?model=gpt-realtime", ["api.example.test"]))
        self.assertNotIn("proxy-authorization", headers)


class FrameStreamTest(unittest.TestCase):
    def test_bytes_arriving_one_by_one_give_the_same_frames(self):
        data = (ws_frame(0x1, b"ab", True, fin=False) + ws_frame(0x9, b"p", True)
                + ws_frame(0x0, b"c" * 300, True) + ws_frame(0x2, b"d" * 70000, True))
        stream = proxy.FrameStream(masked=True, whole=True, max_bytes=1 << 20, side="client")
        items = [item for index in range(len(data)) for item in stream.feed(data[index:index + 1])]
        self.assertEqual([(item[0], item[1], item[2]) for item in items],
                         [("control", 0x9, b"p"), ("message", 0x1, b"ab" + b"c" * 300), ("message", 0x2, b"d" * 70000)])

    def test_passed_on_frames_are_the_bytes_that_came(self):
        data = ws_frame(0x1, b"hello", True) + ws_frame(0xA, b"", True)
        stream = proxy.FrameStream(masked=True, whole=False, max_bytes=100, side="client")
        items = stream.feed(data[:4]) + stream.feed(data[4:])
        raw = b"".join(item[1] for item in items if item[0] == "raw") + items[-1][3]
        self.assertEqual(raw, data)

    def test_rule_breaking_frames_are_refused(self):
        cases = [(ws_frame(0x1, b"x", True, rsv=0x40), 1002), (ws_frame(0x3, b"x", True), 1002),
                 (ws_frame(0x9, b"x" * 126, True), 1002), (ws_frame(0x9, b"x", True, fin=False), 1002),
                 (ws_frame(0x0, b"x", True), 1002), (ws_frame(0x1, b"x", False), 1002),
                 (ws_frame(0x1, b"x" * 101, True), 1009),
                 (ws_frame(0x1, b"x" * 60, True, fin=False) + ws_frame(0x0, b"x" * 60, True), 1009)]
        for data, code in cases:
            with self.subTest(data=data[:4]):
                stream = proxy.FrameStream(masked=True, whole=False, max_bytes=100, side="client")
                with self.assertRaises(proxy.WebSocketError) as caught:
                    stream.feed(data)
                self.assertEqual(caught.exception.code, code)


# --------------------------------------------------------------------------
# Client keys and limits
# --------------------------------------------------------------------------

class ClientKeyConfigTest(unittest.TestCase):
    def test_key_lists(self):
        config = proxy.load_config([], {"OA_API_KEY": "k", "PROXY_API_KEYS": f"{ALICE_KEY}, bob={BOB_KEY}"})
        self.assertEqual(config.proxy_api_keys, (("key1", ALICE_KEY), ("bob", BOB_KEY)))

    def test_bad_key_lists_say_what_to_fix(self):
        for value, words in (("alice=short", "at least 16"), (f"alice={ALICE_KEY},alice={BOB_KEY}", "twice"),
                             (f"a={ALICE_KEY},b={ALICE_KEY}", "same key"), (f"bad name={ALICE_KEY}", "client name")):
            with self.subTest(value=value), self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config([], {"OA_API_KEY": "k", "PROXY_API_KEYS": value})
            self.assertIn("PROXY_API_KEYS", str(caught.exception))
            self.assertIn(words, str(caught.exception))
            self.assertNotIn(ALICE_KEY, str(caught.exception))

    def test_a_bad_key_is_named_as_the_user_gave_it(self):
        for value, said in (("short", "key number 1 in the list is too short"),
                            (f"{ALICE_KEY},a long key with spaces in it",
                             "key number 2 in the list holds a space or a character that is not printable"),
                            ("alice=short", "alice's key is too short")):
            with self.subTest(value=value), self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config([], {"OA_API_KEY": "k", "PROXY_API_KEYS": value})
            self.assertIn(f"PROXY_API_KEYS has a bad key: {said}; use at least 16", str(caught.exception))
            self.assertNotIn("key1", str(caught.exception))  # a name the user never gave
            self.assertNotIn("short", str(caught.exception).replace("too short", ""))  # nor the key

    def test_identify_client(self):
        keys = (("alice", ALICE_KEY), ("bob", BOB_KEY))
        self.assertEqual(proxy.identify_client(f"Bearer {BOB_KEY}", keys), "bob")
        self.assertEqual(proxy.identify_client(f"bearer {ALICE_KEY}", keys), "alice")
        for header in (None, "", ALICE_KEY, f"Basic {ALICE_KEY}", f"Bearer {ALICE_KEY}x", "Bearer "):
            self.assertIsNone(proxy.identify_client(header, keys), header)

    def test_startup_lines_name_clients_never_keys(self):
        config = make_config(host="0.0.0.0", proxy_api_keys=(("alice", ALICE_KEY),))
        lines = proxy.startup_lines(config, 8080)
        text = "\n".join(line for _, line in lines)
        self.assertIn("client keys required (1: alice)", text)
        self.assertNotIn(ALICE_KEY, text)
        self.assertFalse([line for level, line in lines if level >= logging.WARNING])
        open_lines = proxy.startup_lines(make_config(host="0.0.0.0"), 8080)
        warning = [line for level, line in open_lines if level >= logging.WARNING]
        self.assertIn("without client keys: anyone who can reach this port can spend", warning[0])


class ClientKeyTest(ProxyTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY))}

    def test_relayed_routes_need_a_key(self):
        for method, path, body in (("POST", "/message", chat_body()), ("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", b"{}")):
            for headers, said in (({}, "needs a client key"), (bearer("wrong-key-0123456789abcdef"), "not recognised"),
                                  ({"Authorization": ALICE_KEY}, "not recognised")):
                with self.subTest(path=path, headers=headers):
                    response = self.request(method, path, body, headers)
                    error = self.assert_json_error(response, 401, "Authorization: Bearer", said)
                    self.assertEqual(error["code"], "invalid_api_key")
                    self.assertEqual(response.getheader("WWW-Authenticate"), 'Bearer realm="proxy.py"')
                    self.assertNotIn("wrong-key", error["message"])  # a key sent is never echoed
                    self.assertNotIn(ALICE_KEY, error["message"])
        self.assertEqual(self.upstream.requests, [])

    def test_a_valid_key_is_served_and_never_forwarded(self):
        self.upstream.script = lambda received: (json_script({"object": "list", "data": []})
                                                 if "models" in received.path else Script(steps=reply("ok")))
        with self.assertLogs("proxy", logging.INFO) as logs:
            frames = parse_frames(self.post_message(headers=bearer(ALICE_KEY)).read().decode())
            self.assertEqual(self.request("GET", "/v1/models", headers=bearer(BOB_KEY)).status, 200)
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(frames[-1][0], "done")
        for received in self.upstream.requests:
            self.assertEqual(received.headers["Authorization"], f"Bearer {TEST_KEY}")
        log = "\n".join(logs.output)
        self.assertIn("client=alice", log)
        self.assertIn("client=bob", log)
        self.assertNotIn(ALICE_KEY, log)
        self.assertNotIn(BOB_KEY, log)

    def test_health_and_preflight_stay_open(self):
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.assertEqual(self.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}).status, 204)

    def test_sdk_uses_its_api_key_as_the_client_key(self):
        require(openai is not None, "the openai Python package")
        self.upstream.script = openai_like
        base_url = f"http://127.0.0.1:{self.port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key=ALICE_KEY, max_retries=0,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(client.close)
        self.assertEqual(len(client.models.list().data), 2)
        stranger = openai.OpenAI(base_url=base_url, api_key="not-a-client-key-0123456", max_retries=0,
                                 http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(stranger.close)
        with self.assertRaises(openai.AuthenticationError):
            stranger.models.list()


class RateLimitTest(ProxyTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY)), "rate_limit_rpm": 2}

    def test_requests_per_minute_per_client(self):
        self.upstream.script = lambda received: json_script({"data": []})
        for _ in range(2):
            self.assertEqual(self.request("GET", "/v1/models", headers=bearer(ALICE_KEY)).status, 200)
        response = self.request("GET", "/v1/models", headers=bearer(ALICE_KEY))
        error = self.assert_json_error(response, 429, "2 requests per minute", "RATE_LIMIT_RPM")
        self.assertEqual(error["type"], "rate_limit_error")
        self.assertTrue(25 <= int(response.getheader("Retry-After")) <= 30, response.getheader("Retry-After"))
        self.assertEqual(self.request("GET", "/v1/models", headers=bearer(BOB_KEY)).status, 200)
        self.assertEqual(len(self.upstream.requests), 3)


class BudgetPeriodTest(unittest.TestCase):
    def at(self, text):
        return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()

    def test_a_utc_day_and_a_calendar_month_and_the_seconds_until_each_ends(self):
        self.assertEqual(proxy.budget_period("day", self.at("2026-02-28T12:00:00")), ("2026-02-28", 43200))
        self.assertEqual(proxy.budget_period("month", self.at("2026-12-31T23:59:59")), ("2026-12", 1))
        self.assertEqual(proxy.budget_period("month", self.at("2028-02-15T00:00:00")), ("2028-02", 15 * 86400))
        self.assertEqual(proxy.budget_period("day", self.at("2026-03-01T00:00:00")), ("2026-03-01", 86400))


class TokenBudgetTest(ProxyTestCase):
    """Without Redis, budgets are counted in the process (and a restart forgets them)."""

    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY)), "token_budget_month": 6}

    def test_a_client_over_its_monthly_budget_gets_insufficient_quota_until_the_month_ends(self):
        for _ in range(2):  # 5 tokens each: the second starts under the budget and ends over it
            self.assertEqual(parse_frames(self.post_message(headers=bearer(ALICE_KEY)).read().decode())[-1][0],
                             "done")
        response = self.request("POST", "/v1/chat/completions", v1_chat(False),
                                {"Content-Type": "application/json", **bearer(ALICE_KEY)})
        error = self.assert_json_error(response, 429, "used 10 tokens, its budget of 6 a month",
                                       "TOKEN_BUDGET_MONTH", "next calendar month (UTC)")
        self.assertEqual((error["type"], error["code"]), ("insufficient_quota", "insufficient_quota"))
        now = datetime.datetime.now(datetime.timezone.utc)
        next_month = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
                      + datetime.timedelta(days=32)).replace(day=1)
        self.assertLessEqual(abs(int(response.getheader("Retry-After")) - (next_month - now).total_seconds()), 5)
        self.assertEqual(self.post_message(headers=bearer(BOB_KEY)).status, 200)
        self.assertEqual(len(self.upstream.requests), 3)
        self.assertTrue(self.server.wait_idle(5))  # a refusal is counted once its handler ends
        self.assertRegex(self.request("GET", "/metrics").read().decode(),
                         r'proxy_budget_rejections_total\{period="month"\} 1')


class StreamCapTestCase(ProxyTestCase):
    def open_stream(self, key):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), hold] + reply("x")[1:])
        reader = FrameReader(self.post_message(headers=bearer(key)))
        self.assertIsNotNone(reader.next_frame())
        return reader, hold

    def finish(self, reader, hold):
        hold.set()
        self.assertEqual(parse_frames(reader.rest())[-1][0], "done")
        self.assertTrue(self.server.wait_idle(5))


class PerClientStreamCapTest(StreamCapTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY)), "max_streams_per_client": 1}

    def test_one_client_at_its_cap_does_not_stop_another(self):
        reader, hold = self.open_stream(ALICE_KEY)
        response = self.post_message(headers=bearer(ALICE_KEY))
        error = self.assert_json_error(response, 429, "MAX_STREAMS_PER_CLIENT")
        self.assertEqual(error["type"], "rate_limit_error")
        self.assertEqual(response.getheader("Retry-After"), "1")
        self.upstream.script = lambda received: json_script({"data": []})
        self.assertEqual(self.request("GET", "/v1/models", headers=bearer(BOB_KEY)).status, 200)
        self.finish(reader, hold)
        self.assertEqual(self.request("GET", "/v1/models", headers=bearer(ALICE_KEY)).status, 200)


class GlobalStreamCapTest(StreamCapTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY)), "max_streams": 1}

    def test_the_global_cap_is_503(self):
        reader, hold = self.open_stream(ALICE_KEY)
        response = self.request("GET", "/v1/models", headers=bearer(BOB_KEY))
        error = self.assert_json_error(response, 503, "MAX_STREAMS")
        self.assertEqual(error["type"], "overloaded_error")
        self.assertEqual(response.getheader("Retry-After"), "1")
        self.finish(reader, hold)
        self.upstream.script = lambda received: json_script({"data": []})
        self.assertEqual(self.request("GET", "/v1/models", headers=bearer(BOB_KEY)).status, 200)


class StreamCapLoadTest(StreamCapTestCase):
    config_overrides = {"max_streams": 2}
    server_class = _ServedByRecorder

    def test_at_the_cap_refusals_health_and_metrics_never_wait_for_a_worker(self):
        first, hold_first = self.open_stream(ALICE_KEY)
        second, hold_second = self.open_stream(ALICE_KEY)
        refused = self.post_message()
        error = self.assert_json_error(refused, 503, "MAX_STREAMS")
        self.assertEqual(error["type"], "overloaded_error")
        self.assertEqual(refused.getheader("Retry-After"), "1")
        refused_v1 = self.request("POST", "/v1/chat/completions", v1_chat(True), {"Content-Type": "application/json"})
        self.assert_json_error(refused_v1, 503, "MAX_STREAMS")
        sock = self.raw_socket()  # a client that waits for 100 Continue gets its 503 instead
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 30\r\n\r\n")
        self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 503 "))  # no 100 Continue before it
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.assertEqual(self.request("GET", "/metrics").status, 200)
        hold_first.set()
        self.finish(second, hold_second)
        self.assertEqual(parse_frames(first.rest())[-1][0], "done")
        pool = "connection-pool"
        by_target = {}
        for target, name in self.server.served_by:
            by_target.setdefault(target, []).append(name)
        self.assertEqual(by_target["/healthz"], [pool])
        self.assertEqual(by_target["/metrics"], [pool])
        self.assertEqual(by_target["/v1/chat/completions"], [pool])
        self.assertEqual(by_target["/message"][2:], [pool, pool], by_target["/message"])  # the refused ones
        self.assertNotIn(pool, by_target["/message"][:2])  # the relayed ones had workers
        self.assertEqual(len(self.upstream.requests), 2)


class SpendGuardTest(ProxyTestCase):
    config_overrides = {"allowed_models": ("gpt-4o-mini", "text-embedding-3-small"), "max_tokens": 50}

    def test_message_model_must_be_allowed(self):
        error = self.assert_json_error(self.post_message(chat_body(model="gpt-4.5-preview")), 400,
                                       "gpt-4.5-preview", "gpt-4o-mini, text-embedding-3-small")
        self.assertEqual(error["param"], "model")
        self.assertEqual(self.upstream.requests, [])
        self.post_message().read()
        self.assertEqual(self.upstream.requests[0].json()["model"], "gpt-4o-mini")

    def test_message_output_tokens_are_capped(self):
        for sent, want in ((None, 50), (500, 50), (20, 20)):
            with self.subTest(max_tokens=sent):
                body = chat_body() if sent is None else chat_body(max_tokens=sent)
                self.post_message(body).read()
                self.assertEqual(self.upstream.requests[-1].json()["max_tokens"], want)

    def test_v1_models_must_be_allowed(self):
        for path, body in (("/v1/chat/completions", {"model": "o1-pro", "messages": []}),
                           ("/v1/responses", {"model": "o1-pro", "input": "hi"}),
                           ("/v1/embeddings", {"model": "text-embedding-3-large", "input": "hi"})):
            with self.subTest(path=path):
                response = self.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
                self.assert_json_error(response, 400, body["model"], "gpt-4o-mini")
        upload = (b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n\x00\x01\r\n"
                  b"--b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b0--\r\n")
        response = self.request("POST", "/v1/audio/transcriptions", upload,
                                {"Content-Type": "multipart/form-data; boundary=b0"})
        self.assert_json_error(response, 400, '"whisper-1" is not allowed')
        self.assertEqual(self.upstream.requests, [])

    def test_v1_output_tokens_are_capped(self):
        self.upstream.script = lambda received: json_script({})
        cases = [("/v1/chat/completions", {}, {"max_completion_tokens": 50}),
                 ("/v1/chat/completions", {"max_tokens": 900}, {"max_tokens": 50}),
                 ("/v1/chat/completions", {"max_completion_tokens": 900, "max_tokens": 10},
                  {"max_completion_tokens": 50, "max_tokens": 10}),
                 ("/v1/responses", {}, {"max_output_tokens": 50}),
                 ("/v1/responses", {"max_output_tokens": 7}, {"max_output_tokens": 7})]
        for path, fields, want in cases:
            with self.subTest(path=path, fields=fields):
                body = {"model": "gpt-4o-mini", "input": "hi", **fields}
                self.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}).read()
                self.assertEqual(self.upstream.requests[-1].json(), {**body, **want})

    def test_bodies_that_need_no_change_pass_byte_for_byte(self):
        self.upstream.script = lambda received: json_script({})
        raw = b'{ "model" : "gpt-4o-mini",\n  "input": "hi", "max_output_tokens": 10 }'
        self.request("POST", "/v1/responses", raw, {"Content-Type": "application/json"}).read()
        self.assertEqual(self.upstream.requests[-1].body, raw)

    def test_unreadable_json_is_refused_when_a_guard_must_read_it(self):
        response = self.request("POST", "/v1/chat/completions", b"{oops", {"Content-Type": "application/json"})
        self.assert_json_error(response, 400, "not valid JSON")

    def test_default_model_outside_the_list_is_a_config_error(self):
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config([], {"OA_API_KEY": "k", "ALLOWED_MODELS": "gpt-4o", "OA_MODEL": "gpt-4o-mini"})
        self.assertIn("ALLOWED_MODELS", str(caught.exception))

    def test_sdk_gets_bad_request_error(self):
        require(openai is not None, "the openai Python package")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        self.addCleanup(client.close)
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
        self.assertIn("not allowed by this proxy", str(caught.exception))


class MultipartFieldTest(unittest.TestCase):
    def test_finds_a_field_among_parts(self):
        body = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n"
                b"Content-Type: audio/mpeg\r\n\r\n--xy\r\nname=\"model\"\r\n\r\n--xyz\r\n"
                b"content-disposition: form-data; name=model\r\n\r\ngpt-4o-transcribe\r\n--xyz--\r\n")
        self.assertEqual(proxy.multipart_field(body, "multipart/form-data; boundary=xyz", "model"),
                         "gpt-4o-transcribe")
        self.assertIsNone(proxy.multipart_field(body, "multipart/form-data; boundary=xyz", "language"))
        self.assertIsNone(proxy.multipart_field(body, "multipart/form-data", "model"))


class TokenLimitTest(ProxyTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY), ("bob", BOB_KEY)), "rate_limit_tpm": 12}

    def assert_over_tpm(self, key):
        response = self.request("GET", "/v1/models", headers=bearer(key))
        error = self.assert_json_error(response, 429, "12 tokens per minute", "RATE_LIMIT_TPM")
        self.assertEqual(error["type"], "rate_limit_error")
        self.assertTrue(55 <= int(response.getheader("Retry-After")) <= 60, response.getheader("Retry-After"))

    def test_message_usage_counts(self):
        self.upstream.script = Script(steps=reply("a"))  # usage: 5 tokens
        for _ in range(3):
            self.assertEqual(parse_frames(self.post_message(headers=bearer(ALICE_KEY)).read().decode())[-1][0], "done")
        self.assertTrue(self.server.wait_idle(5))
        self.assert_over_tpm(ALICE_KEY)
        self.assertEqual(parse_frames(self.post_message(headers=bearer(BOB_KEY)).read().decode())[-1][0], "done")

    def test_v1_usage_counts_from_streams_and_json_bodies(self):
        bodies = [Script(steps=reply("a")),  # a chat stream with a usage chunk: 5
                  Script(steps=responses_events(["a", "b"])),  # response.completed usage: 5
                  json_script({"object": "list", "data": [], "usage": {"prompt_tokens": 2, "total_tokens": 2}})]
        self.upstream.script = lambda received: bodies[len(self.upstream.requests) - 1]
        for path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
            response = self.request("POST", path, b'{"stream": true}', bearer(ALICE_KEY))
            self.assertEqual(response.status, 200)
            response.read()
        self.assertTrue(self.server.wait_idle(5))
        self.assert_over_tpm(ALICE_KEY)


class StreamObserverTest(unittest.TestCase):
    def test_usage_and_first_token(self):
        token_ends = len(chunk(role="assistant", content="")) + len(chunk(content="a")) - 1  # its last byte
        delta_ends = sum(map(len, responses_events(["a"])[:2])) - 1
        for is_stream, body, usage, first_token_at in (
                (True, b"".join(reply("a")), (3, 2, 5), token_ends),
                (True, b"".join(responses_events(["a", "b", "c"])), (3, 3, 6), delta_ends),
                (True, b"".join(reply("a", usage=False)), None, token_ends),
                (False, b'{"choices": [{"message": {"content": "\\"total_tokens\\": 99"}}], '
                        b'"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}', (1, 2, 3), None),
                (False, b'{"usage": {"input_tokens": 4, "output_tokens": 5}}', (4, 5, 9), None)):
            with self.subTest(body=body[:40]):
                observer, splitter = proxy.StreamObserver(), proxy.EventSplitter()
                pieces = [body[i:i + 5] for i in range(0, len(body), 5)]
                if is_stream:
                    flagged = [i for i, piece in enumerate(pieces)
                               if [event for event in splitter.feed(piece) if observer.see_event(event)]]
                else:
                    flagged = [i for i, piece in enumerate(pieces) if observer.see_bytes(piece)]
                self.assertEqual(observer.finish(), proxy.Usage(*usage) if usage else None)
                self.assertLessEqual(len(flagged), 1)
                self.assertEqual(flagged, [first_token_at // 5] if first_token_at is not None else [])


class ClientByAddressTest(ProxyTestCase):
    config_overrides = {"rate_limit_rpm": 1}

    def test_without_keys_the_client_is_its_address(self):
        self.upstream.script = lambda received: json_script({"data": []})
        self.assertEqual(self.request("GET", "/v1/models").status, 200)
        self.assert_json_error(self.request("GET", "/v1/models"), 429, "RATE_LIMIT_RPM")

    def test_addresses_as_metric_labels_are_bounded(self):
        self.server.metrics.CLIENT_LABELS = 3
        self.upstream.script = lambda received: json_script({
            "id": "c", "object": "chat.completion", "created": CREATED, "model": "x", "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        for number in range(2, 8):  # six addresses, each its own client
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                              source_address=(f"127.0.0.{number}", 0))
            self.addCleanup(conn.close)
            conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m"}).encode(),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
        self.assertTrue(self.server.wait_idle(5))
        text = self.server.metrics.render({})
        labels = set(re.findall(r'proxy_tokens_total\{model="[^"]*",client="([^"]*)"', text))
        self.assertEqual(labels, {"127.0.0.2", "127.0.0.3", "127.0.0.4", "other"})
        self.assertIn('client="other",kind="prompt"} 3', text)


# --------------------------------------------------------------------------
# Health, CORS, logging
# --------------------------------------------------------------------------

class HealthAndCorsTest(ProxyTestCase):
    def test_healthz(self):
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, json.loads(response.read())), (200, {"status": "ok"}))
        self.assertEqual(self.request("HEAD", "/healthz").status, 200)

    def test_preflight(self):
        response = self.request("OPTIONS", "/message", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        self.assertEqual(response.status, 204)
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")
        self.assertIn("POST", response.getheader("Access-Control-Allow-Methods"))
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"), "content-type, authorization")

    def test_every_response_carries_the_origin(self):
        for method, path in (("POST", "/message"), ("GET", "/healthz"), ("GET", "/nope")):
            with self.subTest(path=path):
                response = self.request(method, path, body=chat_body() if method == "POST" else None,
                                        headers={"Origin": "https://app.example"})
                response.read()
                self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "*")


class CorsAllowListTest(ProxyTestCase):
    config_overrides = {"cors_origins": ("https://good.example",)}

    def test_only_listed_origins_are_allowed(self):
        good = self.request("GET", "/healthz", headers={"Origin": "https://good.example"})
        good.read()
        self.assertEqual(good.getheader("Access-Control-Allow-Origin"), "https://good.example")
        self.assertEqual(good.getheader("Vary"), "Origin")
        bad = self.request("OPTIONS", "/message", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        bad.read()
        self.assertEqual([name for name, _ in bad.getheaders() if name.lower().startswith("access-control-")], [])
        good = self.request("OPTIONS", "/message", headers={
            "Origin": "https://good.example", "Access-Control-Request-Method": "POST"})
        good.read()
        self.assertEqual(good.getheader("Access-Control-Allow-Origin"), "https://good.example")
        self.assertIn("POST", good.getheader("Access-Control-Allow-Methods"))


class AccessLogTest(ProxyTestCase):
    def test_one_line_per_request_without_key_or_text(self):
        self.upstream.script = Script(steps=reply("secret-reply-text"))
        with self.assertLogs("proxy", logging.INFO) as logs:
            self.post_message(chat_body("secret-prompt-text")).read()
            self.assertTrue(self.server.wait_idle(5))
        lines = [line for line in logs.output if "/message" in line]
        self.assertEqual(len(lines), 1, logs.output)
        self.assertRegex(lines[0], r'127\.0\.0\.1 "POST /message" 200 \d+\.\d{3}s ttfb=\d+\.\d{3}s '
                                   r'ttft=\d+\.\d{3}s frames=4 bytes=\d+ client=127\.0\.0\.1 model=gpt-4o-mini '
                                   r'tokens=3/2 request_id=- error=- client_left=no')
        for secret in (TEST_KEY, "secret-prompt-text", "secret-reply-text"):
            self.assertNotIn(secret, "\n".join(logs.output))

    def test_failures_are_logged_without_the_key(self):
        self.upstream.script = Script(status=401, headers={"Content-Type": "application/json"},
                                      body=json.dumps({"error": {"message": f"bad key {TEST_KEY}"}}).encode())
        with self.assertLogs("proxy", logging.INFO) as logs:
            self.post_message().read()
            self.assertTrue(self.server.wait_idle(5))
        self.assertIn("502", "\n".join(logs.output))
        self.assertNotIn(TEST_KEY, "\n".join(logs.output))
        self.assertNotIn(TEST_KEY[-4:], "\n".join(logs.output))


# --------------------------------------------------------------------------
# Riding out upstream trouble: retries, fallback, breaker
# --------------------------------------------------------------------------

OVERLOADED = json_script({"error": {"message": "overloaded", "type": "server_error"}}, status=503)


class RetryAfterTest(unittest.TestCase):
    def test_seconds_and_dates(self):
        self.assertEqual(proxy.parse_retry_after("7"), 7)
        soon = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc)
                                           + datetime.timedelta(seconds=30), usegmt=True)
        self.assertTrue(25 <= proxy.parse_retry_after(soon) <= 30)
        self.assertEqual(proxy.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), 0)
        for value in (None, "", "soon", "-3", "1.5"):
            self.assertIsNone(proxy.parse_retry_after(value), value)

    def test_backoff_has_full_jitter_and_a_cap(self):
        delays = [proxy.backoff_delay(3, 0.5) for _ in range(200)]
        self.assertTrue(all(0 <= delay <= 4 for delay in delays))
        self.assertGreater(max(delays) - min(delays), 1)  # spread out, not one fixed delay
        self.assertTrue(all(delay <= proxy.BACKOFF_CAP for delay in (proxy.backoff_delay(20, 0.5) for _ in range(50))))


class BreakerTest(unittest.TestCase):
    def test_opens_lets_one_request_try_and_closes(self):
        now = [100.0]
        breaker = proxy.Breaker(threshold=2, cooldown=30, clock=lambda: now[0])
        breaker.failed()
        self.assertTrue(breaker.allows())
        breaker.failed()
        self.assertFalse(breaker.allows())
        self.assertTrue(breaker.is_down())
        self.assertEqual(breaker.retry_in(), 30)
        now[0] += 29.9
        self.assertFalse(breaker.allows())  # still cooling down
        now[0] += 0.2
        self.assertTrue(breaker.allows())   # the one trial request
        self.assertFalse(breaker.allows())  # and no other meanwhile
        breaker.abandon()                   # the trial's client left: no verdict
        self.assertTrue(breaker.allows())   # so another request may try
        breaker.failed()                    # the trial failed: out for another cool-down
        self.assertFalse(breaker.allows())
        now[0] += 30.1
        self.assertTrue(breaker.allows())
        breaker.succeeded()
        self.assertTrue(breaker.allows() and breaker.allows())  # closed: everyone again
        self.assertFalse(breaker.is_down())

    def test_threshold_0_never_opens(self):
        breaker = proxy.Breaker(threshold=0, cooldown=30)
        for _ in range(100):
            breaker.failed()
        self.assertTrue(breaker.allows())


class RetryTest(ProxyTestCase):
    config_overrides = {"retries": 2, "retry_backoff": 0.01}

    def test_a_503_then_a_good_stream_shows_only_the_good_stream(self):
        self.upstream.script = in_turn(OVERLOADED, Script(steps=reply("fine")))
        with self.assertLogs("proxy", logging.INFO) as logs:
            frames = parse_frames(self.post_message().read().decode())
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(self.contents(frames), ["", "fine", ""])
        self.assertEqual(frames[-1][0], "done")
        self.assertEqual(len(self.upstream.requests), 2)
        log = "\n".join(logs.output)
        self.assertRegex(log, r"attempt 1 to the primary upstream failed \(503\); retrying in \d\.\d\ds")
        self.assertIn("upstream=primary key=1 attempts=2", log)
        metrics = self.request("GET", "/metrics").read().decode()
        self.assertIn('proxy_upstream_attempts_total{upstream="primary",outcome="503"} 1\n', metrics)
        self.assertIn('proxy_upstream_attempts_total{upstream="primary",outcome="answered"} 1\n', metrics)

    def test_retry_after_is_honoured(self):
        waits = []
        self.server.upstreams = proxy.Upstreams(wait=lambda exchange, seconds: waits.append(seconds))
        self.upstream.script = in_turn(json_script({"error": {"message": "slow down"}}, status=429,
                                                   headers={"Retry-After": "7"}), Script(steps=reply("ok")))
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(frames[-1][0], "done")
        self.assertEqual(len(self.upstream.requests), 2)
        self.assertEqual(waits, [7.0])  # the retry waited what the upstream asked for

    def test_a_retry_after_past_the_limit_is_returned_at_once(self):
        self.upstream.script = json_script({"error": {"message": "quota"}}, status=429, headers={"Retry-After": "3600"})
        started = time.monotonic()
        response = self.post_message()
        self.assert_json_error(response, 429, "quota")
        self.assertEqual(response.getheader("Retry-After"), "3600")
        self.assertLess(time.monotonic() - started, 1)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_other_4xx_are_never_retried(self):
        for status in (400, 401, 404, 422):
            with self.subTest(status=status):
                before = len(self.upstream.requests)
                self.upstream.script = json_script({"error": {"message": "no"}}, status=status)
                self.post_message().read()
                self.assertEqual(len(self.upstream.requests), before + 1)

    def test_connection_failures_are_retried(self):
        self.upstream.script = in_turn(Script(hang_up=True), Script(steps=reply("after a reset")))
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(self.contents(frames), ["", "after a reset", ""])

    def test_a_reset_after_the_first_byte_is_not_retried(self):
        self.upstream.script = in_turn(Script(steps=[chunk(role="assistant", content=""), ABORT]),
                                       Script(steps=reply("never")))
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(frames[-1][0], "error")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_v1_is_not_retried_unless_asked(self):
        self.upstream.script = in_turn(OVERLOADED, json_script({"ok": True}))
        response = self.request("POST", "/v1/chat/completions", b"{}", {"Content-Type": "application/json"})
        self.assertEqual((response.status, json.loads(response.read())), (503, json.loads(OVERLOADED.body)))
        self.assertEqual(len(self.upstream.requests), 1)
        self.server.config = dataclasses.replace(self.config, v1_retries=1)
        self.upstream.script = in_turn(OVERLOADED, json_script({"ok": True}))
        response = self.request("POST", "/v1/chat/completions", b"{}", {"Content-Type": "application/json"})
        self.assertEqual((response.status, json.loads(response.read())), (200, {"ok": True}))
        self.assertEqual(len(self.upstream.requests), 3)

    def test_the_client_leaving_during_a_wait_stops_the_retries(self):
        self.upstream.script = in_turn(json_script({"error": {"message": "busy"}}, status=503,
                                                   headers={"Retry-After": "3"}), Script(steps=reply("late")))
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        self.assertTrue(wait_until(lambda: self.upstream.requests), "the first attempt never came")
        sock.close()
        started = time.monotonic()
        self.assertTrue(self.server.wait_idle(2), "the handler kept waiting for a client that left")
        self.assertLess(time.monotonic() - started, 2)  # well before the 3 s wait would have ended
        self.assertEqual(len(self.upstream.requests), 1)  # and the next attempt never reached the upstream


class FallbackTest(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.fallback = FakeUpstream().start()
        self.addCleanup(self.fallback.close)
        self.fallback.script = Script(steps=reply("from the fallback"))
        self.server.config = dataclasses.replace(
            self.config, retries=1, retry_backoff=0.01, fallback_base_url=self.fallback.base_url,
            fallback_api_key="sk-fallback-key-0123456789", fallback_model="backup-model",
            breaker_threshold=2, breaker_cooldown=0.5)

    def test_the_fallbacks_keys_are_used_in_turn(self):
        self.server.config = dataclasses.replace(self.server.config, retries=0,
                                                 fallback_api_key="sk-fallback-one-0123,sk-fallback-two-4567")
        self.upstream.script = OVERLOADED
        for _ in range(4):
            frames = parse_frames(self.post_message().read().decode())
            self.assertEqual(self.contents(frames), ["", "from the fallback", ""])
        self.assertEqual([received.headers["Authorization"] for received in self.fallback.requests],
                         ["Bearer sk-fallback-one-0123", "Bearer sk-fallback-two-4567"] * 2)

    def test_primary_down_fallback_answers(self):
        self.upstream.script = OVERLOADED
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(self.contents(frames), ["", "from the fallback", ""])
        self.assertEqual(len(self.upstream.requests), 2)  # the primary got its retry first
        sent = self.fallback.requests[0]
        self.assertEqual(sent.headers["Authorization"], "Bearer sk-fallback-key-0123456789")
        self.assertEqual(sent.json()["model"], "backup-model")

    def test_unreachable_primary_falls_back(self):
        self.server.config = dataclasses.replace(self.server.config,
                                                 base_url=f"http://127.0.0.1:{free_port()}/v1")
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(self.contents(frames), ["", "from the fallback", ""])

    def test_breaker_opens_and_closes(self):
        now = [1000.0]
        self.server.upstreams = proxy.Upstreams(clock=lambda: now[0])
        self.upstream.script = OVERLOADED
        self.post_message().read()  # two failures on the primary: its breaker opens
        self.assertEqual(len(self.upstream.requests), 2)
        health = self.request("GET", "/healthz")
        self.assertEqual((health.status, json.loads(health.read())),
                         (200, {"status": "ok", "upstreams_down": ["primary"]}))
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(self.contents(frames), ["", "from the fallback", ""])
        self.assertEqual(len(self.upstream.requests), 2)  # skipped while open
        self.upstream.script = Script(steps=reply("primary is back"))
        now[0] += self.server.config.breaker_cooldown + 0.1  # the cool-down passes
        frames = parse_frames(self.post_message().read().decode())
        self.assertEqual(self.contents(frames), ["", "primary is back", ""])  # one trial request, and closed
        self.assertEqual(json.loads(self.request("GET", "/healthz").read()), {"status": "ok"})

    def test_everything_down_is_503_with_retry_after(self):
        self.upstream.script = OVERLOADED
        self.fallback.script = OVERLOADED
        self.post_message().read()  # both upstreams fail twice: both breakers open
        response = self.post_message()
        self.assert_json_error(response, 503, "cool-down")
        self.assertEqual(response.getheader("Retry-After"), "1")
        health = self.request("GET", "/healthz")
        self.assertEqual((health.status, json.loads(health.read())["upstreams_down"]), (503, ["primary", "fallback"]))


# --------------------------------------------------------------------------
# Observability: usage, logs, metrics
# --------------------------------------------------------------------------

# Three upstream keys that look like no key pattern: only masking by value can catch an echo of them.
THREE_KEYS = ("Kf4wQ9zL2xR7vB1nM5tJ8pY3", "Gd6hS0aE3uI9oW2qT7yN4cV1", "Pm8rX5bZ1kD4fH7jU0gA2sE6")


def key_of(received) -> str:
    """Which of THREE_KEYS a request to the fake upstream carried (its position, from 1), or '?'."""
    sent = received.headers.get("Authorization", "")
    return next((str(number) for number, key in enumerate(THREE_KEYS, 1) if sent == f"Bearer {key}"), "?")


class SeveralKeysTest(ProxyTestCase):
    """OA_API_KEY with several keys: spread in turn, a 429'd key rests, a refused key is taken out."""

    config_overrides = {"api_key": ",".join(THREE_KEYS)}

    def keys_used(self, since=0):
        with self.upstream.lock:
            return [key_of(received) for received in self.upstream.requests[since:]]

    def test_1000_requests_are_spread_evenly_over_three_keys(self):
        self.upstream.script = json_script({"object": "list", "data": []})
        def client():
            conn = self.connect()
            for _ in range(250):
                conn.request("GET", "/v1/models")
                response = conn.getresponse()
                response.read()
                self.assertEqual(response.status, 200)
            conn.close()
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        counts = collections.Counter(self.keys_used())
        self.assertEqual(sum(counts.values()), 1000, counts)
        self.assertEqual(set(counts), {"1", "2", "3"}, counts)
        for count in counts.values():
            self.assertLessEqual(abs(count - 1000 / 3), 1000 / 3 * 0.1, counts)

    def test_a_key_answered_429_rests_for_its_retry_after_and_the_request_moves_to_another(self):
        seen = {}

        def script(received):
            if key_of(received) == "2":
                if "limited" not in seen:
                    seen["limited"] = time.monotonic()
                    return json_script({"error": {"message": "Rate limit reached", "type": "requests"}},
                                       status=429, headers={"Retry-After": "2"})
                seen.setdefault("back", time.monotonic())
            return Script(steps=reply("ok"))
        self.upstream.script = script
        json_type = {"Content-Type": "application/json"}
        for route, body in (("/message", chat_body()), ("/v1/chat/completions", v1_chat(True))):
            with self.subTest(route=route):  # V1_RETRIES is 0: moving to another key is not a retry
                seen.clear()
                before = len(self.upstream.requests)
                deadline = time.monotonic() + 10
                while "back" not in seen and time.monotonic() < deadline:
                    response = self.request("POST", route, body, json_type)
                    self.assertEqual(response.status, 200)  # the 429'd request too, on another key
                    self.assertIn(b"ok", response.read())
                self.assertGreaterEqual(seen["back"] - seen["limited"], 2.0)
                self.assertLess(seen["back"] - seen["limited"], 3.5)
                used = self.keys_used(before)
                first, second = used.index("2"), used.index("2", used.index("2") + 1)
                self.assertNotEqual(used[first + 1], "2")  # the same request, at once on another key
                self.assertGreater(second - first, 3, used)  # the others served meanwhile
                self.assertEqual(set(used[first + 1:second]), {"1", "3"}, used)

    def test_without_retry_after_a_key_rests_until_the_reset_of_the_limit_that_ran_out(self):
        seen = {}

        def script(received):
            if key_of(received) == "2" and "limited" not in seen:
                seen["limited"] = time.monotonic()
                return json_script({"error": {"message": "Rate limit reached"}}, status=429, headers={
                    "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
                    "x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "6m0s"})
            if key_of(received) == "2":
                seen.setdefault("back", time.monotonic())
            return json_script({"object": "list", "data": []})
        self.upstream.script = script
        deadline = time.monotonic() + 10
        while "back" not in seen and time.monotonic() < deadline:
            self.assertEqual(self.request("GET", "/v1/models").status, 200)
            if len(self.upstream.requests) == 3:  # the 429 just came: the key rests
                self.assertIn('proxy_upstream_keys{upstream="primary",state="resting"} 1',
                              self.request("GET", "/metrics").read().decode())
        self.assertGreaterEqual(seen["back"] - seen["limited"], 1.0)  # the requests' reset, not the tokens' 6 min
        self.assertLess(seen["back"] - seen["limited"], 2.5)

    def test_a_refused_key_is_taken_out_with_one_warning_and_no_fragment_of_it(self):
        def script(received):
            if key_of(received) == "2":
                return json_script({"error": {"message": f"Incorrect API key provided: {THREE_KEYS[1]}",
                                              "type": "invalid_request_error", "code": "invalid_api_key"}},
                                   status=401)
            if received.path.endswith("/embeddings"):  # an error that quotes another key: masked
                return json_script({"error": {"message": f"bad input for {THREE_KEYS[2]}"}}, status=400)
            return Script(steps=reply("ok"))
        self.upstream.script = script
        answers = []
        with self.assertLogs("proxy", "INFO") as logs:
            for _ in range(12):
                response = self.post_message()
                answers.append(response.read())
                self.assertEqual(response.status, 200, answers[-1])
            response = self.request("POST", "/v1/embeddings", json.dumps({"model": "m", "input": "x"}).encode())
            answers.append(response.read())
            self.assertEqual(response.status, 400)
            answers.append(self.request("GET", "/metrics").read())
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(self.keys_used().count("2"), 1)  # once refused, never tried again
        self.assertEqual(self.keys_used()[:13].count("?"), 0)
        warnings = [line for line in logs.output if "refused key" in line]
        self.assertEqual(len(warnings), 1, logs.output)
        fingerprint = hashlib.sha256(THREE_KEYS[1].encode()).hexdigest()[:6]
        self.assertIn(f"the primary upstream refused key 2 of 3 in --api-key (fingerprint {fingerprint})",
                      warnings[0])
        self.assertIn("requests go to the other keys until the proxy restarts", warnings[0])
        metrics = answers[-1].decode()
        self.assertIn('proxy_upstream_keys{upstream="primary",state="refused"} 1', metrics)
        self.assertIn('proxy_upstream_keys{upstream="primary",state="ready"} 2', metrics)
        self.assertIn('proxy_upstream_key_attempts_total{upstream="primary",key="2",outcome="key_refused"} 1',
                      metrics)
        self.assertRegex(metrics, r'proxy_upstream_key_attempts_total\{upstream="primary",key="1",'
                                  r'outcome="answered"\} [1-9]')
        self.assertRegex("\n".join(logs.output), r"upstream=primary key=[13] attempts=2 ")
        everything = "\n".join(logs.output) + b"\n".join(answers).decode("latin-1")
        for key in THREE_KEYS:
            for start in range(len(key) - proxy.SECRET_FRAGMENT + 1):
                self.assertNotIn(key[start:start + proxy.SECRET_FRAGMENT], everything)

    def test_when_every_key_is_refused_the_client_hears_of_the_refusal(self):
        self.upstream.script = json_script({"error": {"message": "Incorrect API key"}}, status=401)
        with self.assertLogs("proxy", "WARNING"):
            self.assert_json_error(self.post_message(), 502, "refused the proxy's API key")
            self.assert_json_error(self.post_message(), 502, "refused the proxy's API key")
        self.assertEqual(sorted(self.keys_used()[:3]), ["1", "2", "3"])  # each tried once, then each still is

    def test_what_the_refused_key_warnings_counted_is_logged_when_the_proxy_stops(self):
        self.upstream.script = json_script({"error": {"message": "Incorrect API key"}}, status=401)
        with self.assertLogs("proxy", "WARNING") as logs:
            # The first request meets every key refused (a line each); the next three, one key each in turn,
            # within the minute: counted, and written when the proxy stops.
            for _ in range(4):
                self.assert_json_error(self.post_message(), 502, "refused the proxy's API key")
            before_stop = len(logs.output)
            self.server.shutdown()
            self.server.close()
        for number in (1, 2, 3):
            places = [place for place, line in enumerate(logs.output) if f"refused key {number} of 3" in line]
            self.assertEqual(len(places), 2, logs.output)
            self.assertTrue(all("1 time(s) since the last warning" in logs.output[place] for place in places))
            self.assertLess(places[0], before_stop)
            self.assertGreaterEqual(places[1], before_stop)

    def test_a_body_streamed_from_the_client_is_not_sent_twice(self):
        self.upstream.script = json_script({"error": {"message": "Rate limit reached"}}, status=429)
        form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n"
        response = self.request("POST", "/v1/audio/transcriptions", form,
                                {"Content-Type": "multipart/form-data; boundary=b"})
        self.assertEqual(response.status, 429)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_bad_key_lists_are_answered_in_plain_words(self):
        for value, said in ((f"{THREE_KEYS[0]},,{THREE_KEYS[1]}", "holds an empty key"),
                            (f"{THREE_KEYS[0]},", "holds an empty key"),
                            (f"{THREE_KEYS[0]},two words", "holds spaces or control characters in key number 2 of 2"),
                            (f"{THREE_KEYS[0]},{THREE_KEYS[1]},{THREE_KEYS[0]}",
                             "lists a key twice (key number 1 and 3 of 3)")):
            with self.subTest(value=value):
                with self.assertRaises(proxy.ConfigError) as raised:
                    proxy.load_config([], {"OA_API_KEY": value})
                self.assertIn(f"OA_API_KEY {said}", str(raised.exception))
                for key in THREE_KEYS:
                    self.assertNotIn(key[:proxy.SECRET_FRAGMENT], str(raised.exception))
        config = proxy.load_config([], {"OA_API_KEY": f" {THREE_KEYS[0]} , {THREE_KEYS[1]}"})
        self.assertEqual(proxy.keys_in(config.api_key), THREE_KEYS[:2])
        self.assertIn("with 2 keys in turn", proxy.startup_lines(config, 8080)[1][1])


AZURE_KEY = "az9Qw3Er7Ty1Ui5Op2As6Df0"


def with_routes(config, routes, environ=None):
    """config with OA_ROUTES set to routes (a list, written as JSON), its keys read from environ."""
    spec = proxy._parse_routes(json.dumps(routes))
    return dataclasses.replace(config, routes=spec,
                               model_routes=proxy.resolve_routes(spec, config.auth_header, environ or {}))


def long_key(seed: int) -> str:
    """A key shaped like OpenAI's: sk-proj- and 156 characters, the same for the same seed."""
    rng = random.Random(seed)
    return "sk-proj-" + "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(156))


LONG_KEYS = tuple(long_key(seed) for seed in range(6))


class ManyLongKeysTest(ProxyTestCase):
    """Six keys as long as OpenAI's (164 characters): hundreds of blocks, so the masker's quick test looks up
    runs of key characters instead. An upstream that echoes them, cut, whole but split by spaces, escaped, in
    capitals, gets no piece through, and ordinary words pass."""

    config_overrides = {"api_key": ",".join(LONG_KEYS[:3])}

    def setUp(self):
        super().setUp()
        self.server.config = with_routes(self.config, [
            {"models": ["routed"], "upstreams": [{"url": self.upstream.base_url, "keys": "MORE_KEYS"}]}],
            {"MORE_KEYS": ",".join(LONG_KEYS[3:])})

    def test_no_piece_of_any_key_gets_through(self):
        self.assertTrue(proxy.secret_masker(proxy.secrets_of(self.server.config))._by_runs)
        pieces = [LONG_KEYS[0][100:112], LONG_KEYS[1][20:29].upper(), " ".join(LONG_KEYS[2]),
                  "\\n".join([LONG_KEYS[3][:9], LONG_KEYS[3][9:18]]), LONG_KEYS[4][150:], LONG_KEYS[5][8:16]]
        message = "quota exceeded for " + " and ".join(pieces) + "; see the documentation"
        self.upstream.script = json_script({"error": {"message": message, "type": "insufficient_quota"}},
                                           status=400)
        for model in ("gpt-4o-mini", "routed"):
            with self.subTest(model=model):
                response = self.request("POST", "/v1/chat/completions", json.dumps(
                    {"model": model, "messages": [{"role": "user", "content": "Hi"}]}).encode(),
                    {"Content-Type": "application/json"})
                error = json.loads(response.read())["error"]
                self.assertEqual(response.status, 400)
                self.assertTrue(error["message"].startswith("quota exceeded for [redacted]"), error["message"])
                self.assertTrue(error["message"].endswith("; see the documentation"), error["message"])
                flat = re.sub(r"\s|\\[nrt]", "", error["message"]).lower()
                for key in LONG_KEYS:
                    for start in range(len(key) - proxy.SECRET_FRAGMENT + 1):
                        self.assertNotIn(key[start:start + proxy.SECRET_FRAGMENT].lower(), flat)
        ordinary = "the completion finished normally with 1733470000 tokens-per-minute"
        self.upstream.script = json_script({"error": {"message": ordinary, "type": "x"}}, status=400)
        response = self.request("POST", "/v1/chat/completions", v1_chat(False), {"Content-Type": "application/json"})
        self.assertEqual(json.loads(response.read())["error"]["message"], ordinary)


class RoutesTest(ProxyTestCase):
    """OA_ROUTES: models routed to upstreams of their own; everything else to the default."""

    def setUp(self):
        super().setUp()
        self.azure, self.local = FakeUpstream().start(), FakeUpstream().start()
        self.addCleanup(self.azure.close)
        self.addCleanup(self.local.close)
        for fake, words in ((self.upstream, "from openai"), (self.azure, "from azure"), (self.local, "from local")):
            fake.script = Script(steps=reply(words))
        self.server.config = with_routes(self.config, [
            {"models": ["gpt-4o"], "upstreams": [{"url": self.azure.base_url, "keys": "AZURE_KEYS",
                                                  "auth_header": "api-key", "model": "prod-4o",
                                                  "headers": {"X-Deployment": "eu"}}]},
            {"models": ["llama*", "whisper-local"], "upstreams": [{"url": self.local.base_url}]}],
            {"AZURE_KEYS": AZURE_KEY})

    def test_three_models_go_to_three_upstreams_through_the_python_sdk(self):
        require(openai is not None, "the openai Python package")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)
        said = {}
        for model in ("gpt-4o", "llama-3.1-8b", "gpt-4o-mini"):
            stream = client.chat.completions.create(model=model, stream=True,
                                                    messages=[{"role": "user", "content": "Hi"}])
            said[model] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        self.assertEqual(said, {"gpt-4o": "from azure", "llama-3.1-8b": "from local", "gpt-4o-mini": "from openai"})
        azure, local, default = self.azure.requests[0], self.local.requests[0], self.upstream.requests[0]
        self.assertEqual(azure.json()["model"], "prod-4o")  # the alias, sent as the deployment's name
        self.assertEqual(azure.headers["api-key"], AZURE_KEY)
        self.assertEqual(azure.headers["X-Deployment"], "eu")
        self.assertIsNone(azure.headers["Authorization"])
        self.assertEqual(local.json()["model"], "llama-3.1-8b")
        self.assertEqual((local.headers["Authorization"], local.headers["api-key"]), (None, None))  # no keys
        self.assertEqual(default.headers["Authorization"], f"Bearer {TEST_KEY}")
        self.assertEqual((default.headers["api-key"], default.headers["X-Deployment"]), (None, None))

    def test_message_routes_by_its_model_and_a_model_nobody_routes_goes_to_the_default(self):
        frames = parse_frames(self.post_message(chat_body(model="llama3")).read().decode())
        self.assertEqual(self.contents(frames), ["", "from local", ""])
        frames = parse_frames(self.post_message(chat_body(model="gpt-4o-2024-08-06")).read().decode())
        self.assertEqual(self.contents(frames), ["", "from openai", ""])  # "gpt-4o" is exact: no match
        frames = parse_frames(self.post_message().read().decode())  # no model: OA_MODEL, the default's
        self.assertEqual(self.contents(frames), ["", "from openai", ""])
        self.assertEqual((len(self.local.requests), len(self.upstream.requests), len(self.azure.requests)), (1, 2, 0))

    def test_a_streamed_transcription_is_routed_by_its_form_field(self):
        self.local.script = json_script({"text": "transcribed locally"})
        audio = bytes(range(256)) * 400  # 100 KiB after the model field: streamed, not held
        form = (b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-local\r\n'
                b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--xyz--\r\n")
        response = self.request("POST", "/v1/audio/transcriptions", form,
                                {"Content-Type": "multipart/form-data; boundary=xyz"})
        self.assertEqual(json.loads(response.read()), {"text": "transcribed locally"})
        self.assertEqual(self.local.requests[0].body, form)  # whole, as sent
        self.assertEqual(self.upstream.requests, [])

    def test_a_routed_upstreams_key_is_masked_wherever_its_upstream_echoes_it(self):
        escaped_key = escaped(AZURE_KEY)
        self.azure.script = Script(status=400, headers={"Content-Type": "application/json",
                                                        "X-Echo": f"key={AZURE_KEY}"},
                                   body=b'{"error": {"message": "bad key %b, or %b", "type": "invalid_request_error"}}'
                                   % (AZURE_KEY.encode(), escaped_key.encode()))
        with self.assertLogs("proxy", "INFO") as logs:
            response = self.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}).encode(),
                {"Content-Type": "application/json"})
            raw = response.read().decode() + str(response.getheaders())
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(response.status, 400)
        self.assertIn("[redacted]", raw)
        for text in (raw, "\n".join(logs.output)):
            decoded = re.sub(r"\\u([0-9a-fA-F]{4})", lambda match: chr(int(match.group(1), 16)), text)
            for start in range(len(AZURE_KEY) - proxy.SECRET_FRAGMENT + 1):
                self.assertNotIn(AZURE_KEY[start:start + proxy.SECRET_FRAGMENT], decoded)

    def test_the_model_list_names_the_routed_models(self):
        self.upstream.model_list = ["gpt-4o-mini", "gpt-4o"]
        listing = json.loads(self.request("GET", "/v1/models").read())
        self.assertEqual([entry["id"] for entry in listing["data"]], ["gpt-4o-mini", "gpt-4o", "whisper-local"])
        self.assertEqual(listing["data"][2]["owned_by"], "proxy.py route 2")  # llama* is no model: not listed

    def test_the_access_record_and_metrics_name_the_upstream(self):
        with self.assertLogs("proxy", "INFO") as logs:
            self.post_message(chat_body(model="gpt-4o")).read()
            self.assertTrue(self.server.wait_idle(5))
        self.assertRegex("\n".join(logs.output), r"model=gpt-4o .* upstream=route1\.1 key=1 attempts=1 ")
        metrics = self.request("GET", "/metrics").read().decode()
        self.assertIn('proxy_upstream_key_attempts_total{upstream="route1.1",key="1",outcome="answered"} 1', metrics)
        self.assertIn('proxy_upstream_keys{upstream="route1.1",state="ready"} 1', metrics)

    def test_bad_routes_are_answered_at_start_in_plain_words(self):
        upstream = {"url": "http://127.0.0.1:9/v1"}
        cases = (("not json", "OA_ROUTES is not JSON"),
                 (json.dumps({"models": ["m"]}), "OA_ROUTES must be a JSON array of routes"),
                 (json.dumps([{"models": ["m"], "upstreams": [upstream], "weight": 2}]),
                  "OA_ROUTES route 1 has an unknown field 'weight'"),
                 (json.dumps([{"models": ["m"], "upstreams": [dict(upstream, key="X")]}]),
                  "OA_ROUTES route 1 upstream 1 has an unknown field 'key'"),
                 (json.dumps([{"models": ["m"], "upstreams": [upstream]}, {"upstreams": [upstream]}]),
                  'OA_ROUTES route 2 needs "models"'),
                 (json.dumps([{"models": ["m"], "upstreams": []}]), 'OA_ROUTES route 1 needs "upstreams"'),
                 (json.dumps([{"models": ["m"], "upstreams": [dict(upstream, keys="NOT_SET_ANYWHERE")]}]),
                  "OA_ROUTES route 1 upstream 1 takes its keys from NOT_SET_ANYWHERE, which is not set"),
                 (json.dumps([{"models": ["m"], "upstreams": [dict(upstream, keys="EMPTY_KEYS")]}]),
                  "takes its keys from EMPTY_KEYS, which is empty"),
                 (json.dumps([{"models": ["m"], "upstreams": [dict(upstream, keys=AZURE_KEY)]}]),
                  '"keys" names the environment variable holding its keys'),
                 (json.dumps([{"models": ["m"], "upstreams": [{"url": "api.openai.com/v1"}]}]),
                  "OA_ROUTES route 1 upstream 1's url must be an http:// or https:// URL"))
        for value, said in cases:
            with self.subTest(said=said):
                result = run_proxy_cli(env={"OA_API_KEY": "k", "OA_ROUTES": value, "EMPTY_KEYS": " "})
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn(said, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn(AZURE_KEY[:proxy.SECRET_FRAGMENT], result.stderr)  # a key given by mistake
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "routes.json")
        with open(path, "w") as out:
            json.dump([{"models": ["gpt-4o"], "upstreams": [dict(upstream, keys="AZURE_KEYS")]}], out)
        config = proxy.load_config([], {"OA_API_KEY": "k", "OA_ROUTES": f"@{path}", "AZURE_KEYS": AZURE_KEY})
        self.assertEqual(config.model_routes[0].upstreams[0].keys, (AZURE_KEY,))
        self.assertIn(AZURE_KEY, proxy.secrets_of(config))
        lines = "\n".join(text for _, text in proxy.startup_lines(config, 8080))
        self.assertIn("route 1 (OA_ROUTES): gpt-4o -> http://127.0.0.1:9/v1 (1 key from AZURE_KEYS", lines)
        self.assertNotIn(AZURE_KEY[:proxy.SECRET_FRAGMENT], lines)
        result = run_proxy_cli(env={"OA_API_KEY": "k", "OA_ROUTES": "@/nonexistent/routes.json"})
        self.assertIn("OA_ROUTES names the file '/nonexistent/routes.json', which cannot be read", result.stderr)


class RoutesExamplesTest(unittest.TestCase):
    """docs/configuration.md's three worked examples of keys and routes, run as written, against fake
    upstreams in place of OpenAI, Azure and the local server (their URLs replaced, nothing else)."""

    def setUp(self):
        self.fakes = {}
        for name in ("openai", "azure", "local"):
            fake = self.fakes[name] = FakeUpstream().start()
            self.addCleanup(fake.close)
            fake.script = Script(steps=reply(f"from {name}"))
        with open(os.path.join(HERE, "docs", "configuration.md"), encoding="utf-8") as page:
            self.section = page.read().split("## Routes: several upstreams by model", 1)[1]
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)

    def run_example(self, number):
        """Run one example's shell lines: exports, a here-document, the proxy, then its curl; the curl's
        answer (None if it has none)."""
        script = self.section.split(f"**Example {number}:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        for real, name in (("https://api.openai.com/v1", "openai"), ("https://myres.openai.azure.com/openai/v1",
                                                                      "azure"), ("http://127.0.0.1:11434/v1", "local")):
            script = script.replace(real, self.fakes[name].base_url)
        env = {"OPENAI_BASE_URL": self.fakes["openai"].base_url}
        lines = iter(script.replace("\\\n", " ").splitlines())
        answer = None
        for line in lines:
            words = shlex.split(line)
            if words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])
            elif words[0] == "cat":  # cat > FILE <<'END' ... END
                with open(os.path.join(self.folder, words[2]), "w") as out:
                    out.write("".join(f"{text}\n" for text in iter(lines.__next__, words[3].strip("<'\""))))
            elif "python3" in words:
                assignments = dict(word.split("=", 1) for word in words[:words.index("python3")])
                env.update({name: value.replace("@", "@" + self.folder + "/", 1) for name, value in assignments.items()})
                self.proxy = ProxyProcess(env=env)
                self.addCleanup(self.proxy.kill)
            elif words[0] == "curl":
                answer = self.post(words[words.index("-N") + 1].split("8080", 1)[1], words[words.index("-d") + 1])
        return answer

    def post(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        return response.read().decode()

    def test_example_1_two_keys_in_turn(self):
        self.assertIsNone(self.run_example(1))
        for _ in range(4):
            self.assertIn("from openai", self.post("/v1/chat/completions", v1_chat(True).decode()))
        self.assertEqual([received.headers["Authorization"] for received in self.fakes["openai"].requests],
                         ["Bearer sk-proj-first", "Bearer sk-proj-second"] * 2)

    def test_example_2_an_azure_deployment_with_an_alias(self):
        self.assertIn("from azure", self.run_example(2))
        sent = self.fakes["azure"].requests[0]
        self.assertEqual((sent.headers["api-key"], sent.json()["model"]), ("your-azure-key", "prod-4o"))
        self.assertIsNone(sent.headers["Authorization"])
        self.assertIn("from openai", self.post("/v1/chat/completions", v1_chat(True).decode()))

    def test_example_3_a_local_server_for_llama(self):
        self.assertIn("from local", self.run_example(3))
        self.assertIsNone(self.fakes["local"].requests[0].headers["Authorization"])
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
        for _ in range(2):
            self.assertIn("from openai", self.post("/message", body))
        self.assertEqual([received.headers["Authorization"] for received in self.fakes["openai"].requests],
                         ["Bearer sk-proj-first", "Bearer sk-proj-second"])


class UsageTest(ProxyTestCase):
    def stream_chat(self, body):
        response = self.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                                {"Content-Type": "application/json"})
        return response.read()

    def test_streamed_chat_asks_for_usage_and_hides_it_from_clients_that_did_not(self):
        self.upstream.script = lambda received: Script(steps=reply("Hi", usage=bool(
            (received.json().get("stream_options") or {}).get("include_usage"))))
        with self.assertLogs("proxy", logging.INFO) as logs:
            body = self.stream_chat({"model": "gpt-4o-mini", "stream": True, "messages": []})
            self.assertTrue(self.server.wait_idle(5))
        self.assertEqual(self.upstream.requests[0].json()["stream_options"], {"include_usage": True})
        self.assertEqual(body, b"".join(reply("Hi", usage=False)))  # all but the usage chunk, untouched
        self.assertIn("tokens=3/2", logs.output[-1])

    def test_clients_that_asked_for_usage_get_it(self):
        self.upstream.script = lambda received: Script(steps=reply("Hi"))
        body = self.stream_chat({"model": "gpt-4o-mini", "stream": True, "messages": [],
                                 "stream_options": {"include_usage": True}})
        self.assertEqual(body, b"".join(reply("Hi")))
        self.assertEqual(self.upstream.requests[0].json()["stream_options"], {"include_usage": True})

    def test_responses_usage_is_recorded(self):
        self.upstream.script = Script(steps=responses_events(["a", "b"]))
        with self.assertLogs("proxy", logging.INFO) as logs:
            self.request("POST", "/v1/responses", b'{"model": "gpt-4o", "stream": true}',
                         {"Content-Type": "application/json"}).read()
            self.assertTrue(self.server.wait_idle(5))
        self.assertRegex(logs.output[-1], r"ttft=\d+\.\d{3}s .* model=gpt-4o tokens=3/2 ")


class MetricsTest(ProxyTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),), "rate_limit_rpm": 4, "idle_timeout": 0.3}

    def exercise(self):
        """A known mix of requests: every metric gets something to count."""
        self.upstream.script = Script(steps=reply("a"))
        self.post_message(headers=bearer(ALICE_KEY)).read()  # tokens 3 + 2 for gpt-4o-mini, alice
        self.upstream.script = json_script({"error": {"message": "down", "type": "server_error"}}, status=500)
        self.request("GET", "/v1/models", headers=bearer(ALICE_KEY)).read()  # upstream error: status
        self.upstream.script = Script(hold_headers=True)
        self.post_message(headers=bearer(ALICE_KEY)).read()  # upstream error: timeout
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), HANG])
        sock = self.raw_socket()
        body = chat_body()
        sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\nContent-Length: %d\r\n\r\n%b"
                     % (ALICE_KEY.encode(), len(body), body))
        self.assertIn(b"200 OK", sock.recv(4096))
        sock.close()  # a client that leaves
        self.assertTrue(self.upstream.disconnected.wait(2))
        self.assertTrue(self.server.wait_idle(5))
        self.post_message(headers=bearer(ALICE_KEY)).read()  # the fifth in a minute: over RATE_LIMIT_RPM
        self.assertTrue(self.server.wait_idle(5))  # counted once its handler ends: maybe after the client read it

    def test_a_model_label_is_a_configured_model_or_other(self):
        self.upstream.script = lambda received: json_script({
            "id": "c", "object": "chat.completion", "created": CREATED, "model": "x", "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        for number in range(3):  # three made-up models: one series between them
            self.request("POST", "/v1/chat/completions", json.dumps({"model": f"made-up-{number}"}).encode(),
                         {"Content-Type": "application/json", **bearer(ALICE_KEY)}).read()
        self.assertTrue(self.server.wait_idle(5))  # each request is counted once its handler ends
        text = self.scrape()
        self.assertNotIn("made-up", text)
        self.assertIn('proxy_tokens_total{model="other",client="alice",kind="prompt"} 3', text)

    def scrape(self):
        response = self.request("GET", "/metrics")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        return response.read().decode()

    def test_metrics_count_what_happened(self):
        self.exercise()
        text = self.scrape()
        for line in ('proxy_requests_total{route="/message",status="200"} 2',
                     'proxy_requests_total{route="/v1/models",status="500"} 1',
                     'proxy_requests_total{route="/message",status="504"} 1',
                     'proxy_requests_total{route="/message",status="429"} 1',
                     'proxy_upstream_errors_total{kind="status"} 1', 'proxy_upstream_errors_total{kind="timeout"} 1',
                     'proxy_tokens_total{model="gpt-4o-mini",client="alice",kind="prompt"} 3',
                     'proxy_tokens_total{model="gpt-4o-mini",client="alice",kind="completion"} 2',
                     "proxy_client_disconnects_total 1", "proxy_active_streams 0",
                     'proxy_rate_limit_rejections_total{reason="requests_per_minute"} 1',
                     'proxy_request_duration_seconds_count{route="/message"} 4',
                     'proxy_time_to_first_token_seconds_count{route="/message"} 1'):
            self.assertIn(line + "\n", text)
        opened, sent = len(self.upstream.connections), len(self.upstream.requests)  # as the upstream saw them
        for line in (f'proxy_upstream_connections_opened_total{{upstream="primary"}} {opened}',
                     f'proxy_upstream_connections_reused_total{{upstream="primary"}} {sent - opened}',
                     'proxy_upstream_idle_connections{upstream="primary"} 0'):  # the last one was timed out
            self.assertIn(line + "\n", text)
        self.assertNotIn(ALICE_KEY, text)
        self.assertNotIn(TEST_KEY, text)

    def test_process_cpu_seconds_count_this_process(self):
        def cpu_seconds():
            return float(re.search(r"^process_cpu_seconds_total (\S+)$", self.scrape(), re.M).group(1))
        process_before = time.process_time()
        before = cpu_seconds()
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:  # the proxy runs in this process: burn 0.2 s of its CPU
            pass
        spent = cpu_seconds() - before
        process_spent = time.process_time() - process_before  # a window around the proxy's two readings
        self.assertGreaterEqual(spent, 0.2)
        self.assertLessEqual(spent, process_spent)

    def test_a_real_prometheus_parser_reads_it(self):
        require(text_string_to_metric_families is not None, "the prometheus_client package (its text parser)")
        self.exercise()
        families = {family.name: family for family in text_string_to_metric_families(self.scrape())}
        self.assertEqual(families["proxy_requests"].type, "counter")
        self.assertEqual(families["proxy_active_streams"].type, "gauge")
        self.assertEqual(families["process_cpu_seconds"].type, "counter")
        self.assertEqual(families["proxy_upstream_connections_opened"].type, "counter")
        self.assertEqual(families["proxy_upstream_connections_reused"].type, "counter")
        self.assertEqual(families["proxy_upstream_idle_connections"].type, "gauge")
        duration = families["proxy_request_duration_seconds"]
        self.assertEqual(duration.type, "histogram")
        buckets = [s for s in duration.samples if s.name.endswith("_bucket") and s.labels["route"] == "/message"]
        counts = [s.value for s in buckets]
        self.assertEqual(counts, sorted(counts))  # cumulative
        self.assertEqual(buckets[-1].labels["le"], "+Inf")
        self.assertEqual(buckets[-1].value, 4)
        tokens = {(s.labels["kind"], s.labels["client"]): s.value for s in families["proxy_tokens"].samples}
        self.assertEqual(tokens, {("prompt", "alice"): 3, ("completion", "alice"): 2})

    def test_unreachable_upstream_counts_as_connect(self):
        self.server.config = dataclasses.replace(self.config, base_url=f"http://127.0.0.1:{free_port()}/v1")
        self.assert_json_error(self.post_message(headers=bearer(ALICE_KEY)), 502)
        self.assertTrue(self.server.wait_idle(5))
        self.assertIn('proxy_upstream_errors_total{kind="connect"} 1\n', self.scrape())

    def test_metrics_token(self):
        self.server.config = dataclasses.replace(self.config, metrics_token="metrics-secret-0123")
        self.assert_json_error(self.request("GET", "/metrics"), 401, "METRICS_TOKEN")
        self.assertEqual(self.request("GET", "/metrics", headers=bearer("metrics-secret-0123")).status, 200)

    def test_route_labels_are_bounded(self):
        for path, want in (("/v1/chat/completions", "/v1/chat/completions"), ("/v1/files/file-abc/content",
                           "/v1/files"), ("/v1/responses/resp_1", "/v1/responses"), ("/v1/zzz", "/v1/other"),
                           ("/v1/chat/zzz", "/v1/chat"), ("/nope", "other"), ("/message", "/message")):
            self.assertEqual(proxy.metric_route(path), want)


class JsonLogTest(unittest.TestCase):
    def test_json_lines_with_every_field(self):
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        upstream.script = Script(steps=reply("secret-reply-text"), headers={
            "Content-Type": "text/event-stream", "x-request-id": "req_42"})
        process = ProxyProcess("--base-url", upstream.base_url,
                               env={"OA_API_KEY": TEST_KEY, "LOG_FORMAT": "json",
                                    "PROXY_API_KEYS": f"alice={ALICE_KEY}"})
        self.addCleanup(process.kill)
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", chat_body("secret-prompt-text"), bearer(ALICE_KEY))
        conn.getresponse().read()
        process.wait_for_line(r'"path": "/message"')
        process.signal(signal.SIGTERM)
        self.assertEqual(process.wait(), 0)
        process.lines.put(None)
        lines = process.log + [line for line in iter(process.lines.get, None)]
        records = [json.loads(line) for line in lines]  # every line is JSON
        access = next(r for r in records if r.get("path") == "/message")
        self.assertEqual({k: access[k] for k in ("address", "client", "method", "path", "model", "status", "frames",
                                                 "prompt_tokens", "completion_tokens", "request_id", "error",
                                                 "client_left", "upstream_reused", "level")},
                         {"address": "127.0.0.1", "client": "alice", "method": "POST", "path": "/message",
                          "model": "gpt-4o-mini", "status": 200, "frames": 4, "prompt_tokens": 3,
                          "completion_tokens": 2, "request_id": "req_42", "error": None, "client_left": False,
                          "upstream_reused": False, "level": "info"})
        for name in ("time", "bytes", "duration", "ttfb", "ttft"):
            self.assertIsNotNone(access[name], name)
        self.assertTrue(access["time"].endswith("Z"))
        text = "".join(lines)
        for secret in (TEST_KEY, ALICE_KEY, "secret-prompt-text", "secret-reply-text"):
            self.assertNotIn(secret, text)
        self.assertTrue(any("listening on" in r.get("message", "") for r in records))


# --------------------------------------------------------------------------
# Fuzzing: mutated requests and randomly typed bodies against a running proxy
# --------------------------------------------------------------------------

FUZZ_FIELDS = ("model", "messages", "role", "content", "stream", "stream_options", "include_usage", "max_tokens",
               "max_completion_tokens", "max_output_tokens", "temperature", "top_p", "seed", "stop", "n", "input",
               "tools", "name", "user")
FUZZ_SCALARS = (None, True, False, 0, -1, 1, 2.5, 10 ** 30, -1e308, "", "m", "user", "gpt-4o-mini", "\u2028",
                "\x00", "a\r\nb", "\"", "x" * 300)
FUZZ_INSERTS = (b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"\t", b"\r\n ", b"%", b"%2F", b"%2e%2e", b"..", b"/",
                b"\\", b"\xff", b"\xc3\xa9", b'"', b"{", b"[", b"9" * 20, b"-1", b"Transfer-Encoding: chunked\r\n",
                b"Content-Length: 5\r\n", b"Content-Length: 99999999999\r\n", b"Expect: 100-continue\r\n",
                b"Connection: keep-alive\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n")


def fuzz_value(rng, depth=0):
    """A JSON value of a random type, nested a little, with field names the proxy reads."""
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and roll < 0.3:
        return {rng.choice(FUZZ_FIELDS): fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(FUZZ_SCALARS)


def fuzz_body(rng) -> bytes:
    """A JSON object with randomly typed fields, often with a plausible messages list."""
    body = {name: fuzz_value(rng) for name in rng.sample(FUZZ_FIELDS, rng.randint(0, 6))}
    if rng.random() < 0.6:
        body["messages"] = [{"role": fuzz_value(rng) if rng.random() < 0.3 else "user",
                             "content": fuzz_value(rng) if rng.random() < 0.3 else "Hi"}
                            for _ in range(rng.randint(0, 3))]
    return json.dumps(body).encode()


def fuzz_json_request(rng) -> bytes:
    path = rng.choice((b"/message", b"/v1/chat/completions", b"/v1/responses", b"/v1/embeddings",
                       b"/v1/completions"))
    body = fuzz_body(rng)
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (path, len(body), body))


def fuzz_seeds():
    """Well-formed requests of every kind the proxy serves, to mutate."""
    chat = chat_body()
    v1 = v1_chat(True)
    form = (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n")
    json_head = b"Content-Type: application/json\r\nContent-Length: %d\r\n"
    return [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"x\"\r\n\r\n",
        b"GET /ui/app.js HTTP/1.0\r\n\r\n",
        b"OPTIONS /message HTTP/1.1\r\nHost: x\r\nOrigin: http://a\r\nAccess-Control-Request-Method: POST\r\n\r\n",
        b"POST /message HTTP/1.1\r\nHost: x\r\n" + json_head % len(chat) + b"\r\n" + chat,
        b"POST /message HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + json_head % len(chat) + b"\r\n" + chat,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + json_head % len(v1) + b"\r\n" + v1,
        b"GET /v1/models?limit=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /v1/files/file-1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(form), form),
        # What an outside abuse run found (issue 23): a lone surrogate, numbers JSON cannot carry, and an
        # empty Transfer-Encoding beside a Content-Length with a second request after the body.
        *(b"POST %b HTTP/1.1\r\nHost: x\r\n%b\r\n%b" % (path, json_head % len(odd), odd)
          for path in (b"/message", b"/v1/chat/completions") for odd in (
              b'{"messages": [{"role": "user", "content": "\\ud800"}], "stream": true, "model": "m"}',
              b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999, "model": "m"}',
              b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN, "seed": Infinity}')),
        b"POST /message HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n" + json_head % len(chat) + b"\r\n" + chat
        + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    ]


def fuzz_mutate(rng, data: bytes) -> bytes:
    """A few random edits: a byte changed, bytes inserted, removed, repeated, or the end cut."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        edit = rng.randrange(5)
        if edit == 0 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        elif edit == 1:
            data[where:where] = rng.choice(FUZZ_INSERTS)
        elif edit == 2:
            del data[where:where + rng.randint(1, 16)]
        elif edit == 3:
            start = rng.randrange(len(data) + 1)
            data[where:where] = data[start:start + rng.randint(1, 32)]
        else:
            del data[where:]
    return bytes(data)


RESPONSE_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


class FuzzTest(ProxyTestCase):
    """Thousands of seeded, mutated requests: every answer is HTTP below 500 (501 and 505 aside), the log
    holds no traceback, and a long stream running meanwhile arrives intact."""

    SEED = 15
    COUNT = 2400
    WORKERS = 8
    config_overrides = {"allowed_models": ("m", "gpt-4o-mini"), "max_tokens": 100, "max_connections": 256}

    def setUp(self):
        super().setUp()
        self.long_words = [f"w{number} " for number in range(300)]
        steps = reply(*self.long_words)
        self.upstream.script = lambda received: Script(
            steps=[step for word in steps for step in (word, 0.004)] if b"LONG-STREAM" in received.body
            else reply("Hello", " world"))

    def answer(self, request: bytes, end: str) -> bytes:
        """Send a request and read the answer; `end` says how the client ends its side:
        "close" (its request says so), "half" (a half-close), or "reset" (it resets, reading nothing)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            try:
                sock.sendall(request)
                if end == "half":  # the proxy sees the end at once: no request waits out a timeout
                    sock.shutdown(socket.SHUT_WR)
            except OSError:  # the proxy answered and closed before taking it all: its answer is still there
                pass
            if end == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return b""
            return read_until_closed(sock, 10)
        except ConnectionResetError:
            return b""
        finally:
            sock.close()

    def run_long_stream(self, frames):
        conn = self.connect(timeout=30)
        try:
            conn.request("POST", "/message", chat_body("LONG-STREAM"))
            frames.extend(parse_frames(conn.getresponse().read().decode()))
        finally:
            conn.close()

    def test_mutated_requests_never_reach_a_5xx_or_a_traceback(self):
        rng = random.Random(self.SEED)
        seeds = fuzz_seeds()
        requests = []
        for _ in range(self.COUNT):
            roll = rng.random()
            if roll < 0.3:
                requests.append((fuzz_json_request(rng), "close"))
            elif roll < 0.4:
                requests.append((rng.choice(seeds), "reset"))
            else:
                requests.append((fuzz_mutate(rng, rng.choice(seeds)), "half"))
        crashes = []
        previous_hook, threading.excepthook = threading.excepthook, crashes.append
        self.addCleanup(setattr, threading, "excepthook", previous_hook)
        long_frames = []
        with self.assertLogs("proxy", "DEBUG") as logs:
            long_stream = threading.Thread(target=self.run_long_stream, args=(long_frames,))
            long_stream.start()
            with concurrent.futures.ThreadPoolExecutor(self.WORKERS) as pool:
                answers = list(pool.map(lambda item: self.answer(*item), requests))
            long_stream.join(30)
            self.assertTrue(self.server.wait_idle(10))
        bad = [(request[:120], answer[:200]) for (request, _), answer in zip(requests, answers)
               for status in RESPONSE_STATUS.findall(answer) if int(status) >= 500 and int(status) not in (501, 505)]
        self.assertEqual(bad[:5], [], f"{len(bad)} answers were a 5xx")
        self.assertGreater(sum(1 for answer in answers if RESPONSE_STATUS.match(answer)), self.COUNT // 2)
        self.assertFalse([record.getMessage()[:300] for record in logs.records
                          if record.exc_info or record.levelno >= logging.ERROR])
        self.assertEqual(crashes, [])
        self.assertEqual("".join(self.contents(long_frames)), "".join(self.long_words))
        self.assertEqual(long_frames[-1][0], "done")


# --------------------------------------------------------------------------
# The chat UI: serving, and a real browser
# --------------------------------------------------------------------------

class UiServingTest(ProxyTestCase):
    def test_files_types_and_security_headers(self):
        for path, content_type, marker in (("/", "text/html; charset=utf-8", b"<!doctype html>"),
                                           ("/ui/index.html", "text/html; charset=utf-8", b"<!doctype html>"),
                                           ("/ui/app.js", "text/javascript; charset=utf-8", b"import"),
                                           ("/ui/style.css", "text/css; charset=utf-8", b":root")):
            with self.subTest(path=path):
                response = self.request("GET", path)
                body = response.read()
                self.assertEqual((response.status, response.getheader("Content-Type")), (200, content_type))
                self.assertIn(marker, body)
                csp = response.getheader("Content-Security-Policy")
                self.assertIn("script-src 'self'", csp)
                self.assertNotIn("unsafe-inline", csp)
                self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")

    def test_etag_and_304(self):
        first = self.request("GET", "/ui/app.js")
        body = first.read()
        etag = first.getheader("ETag")
        again = self.request("GET", "/ui/app.js", headers={"If-None-Match": etag})
        self.assertEqual((again.status, again.read()), (304, b""))
        stale = self.request("GET", "/ui/app.js", headers={"If-None-Match": '"other"'})
        self.assertEqual((stale.status, stale.read()), (200, body))
        head = self.request("HEAD", "/")
        self.assertEqual((head.status, head.read()), (200, b""))

    def test_no_inline_script_in_the_page(self):
        page = self.request("GET", "/").read().decode()
        for script in re.findall(r"<script[^>]*>(.*?)</script>", page, re.S):
            self.assertEqual(script.strip(), "")
        self.assertNotRegex(page, r"\son\w+=")

    def test_only_ui_files_are_served(self):
        for path in ("/ui/", "/ui/nope.js", "/ui/../proxy.py", "/ui/%2e%2e/proxy.py", "/ui//ui/app.js",
                     "/ui/app.js/", "/ui/./app.js", "/proxy.py", "/ui/.hidden"):
            with self.subTest(path=path):
                response = self.send_raw(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                body = response.read()
                self.assertIn(response.status, (400, 404))
                self.assertNotIn(b"def main(argv", body)

    def test_config_for_the_page(self):
        self.assertEqual(json.loads(self.request("GET", "/ui/config.json").read()),
                         {"model": "gpt-4o-mini", "models": [], "auth_required": False})


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("PROXY_TEST_SCREENSHOTS") or tempfile.mkdtemp(prefix="proxy-screenshots-")


class BrowserTestCase(ProxyTestCase):
    """Headless Chromium driving the page against the proxy and the fake upstream."""

    browser = None

    @classmethod
    def setUpClass(cls):
        chromium = os.environ.get("PROXY_TEST_CHROMIUM") or shutil.which("chromium")
        require(sync_playwright is not None and chromium, "playwright (Python) and Debian's chromium")
        cls.playwright = sync_playwright().start()
        cls.browser = cls.playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

    @classmethod
    def tearDownClass(cls):
        if cls.browser is not None:
            cls.browser.close()
            cls.playwright.stop()

    def setUp(self):
        super().setUp()
        # The page asks GET /v1/models once it loads: answered at once, whatever a test scripts for its chat.
        self.upstream.model_list = []

    def open_page(self, width=1280, height=800):
        context = self.browser.new_context(viewport={"width": width, "height": height})
        self.addCleanup(context.close)
        page = context.new_page()
        self.page_errors, self.dialogs = [], []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"http://127.0.0.1:{self.port}/")
        page.wait_for_function("() => document.activeElement?.id === 'input'")  # app.js has started
        return page

    def wait_for_stats(self, page):
        page.wait_for_function("() => document.querySelector('.message.assistant:last-of-type .meta')"
                               "?.innerText !== ''")

    def send(self, page, text):
        page.fill("#input", text)
        page.press("#input", "Enter")

    def reply_text(self, page):
        return page.inner_text(".message.assistant:last-of-type .body")

    def wait_for_reply(self, page, text):
        page.wait_for_function("text => document.querySelector('.message.assistant:last-of-type .body')"
                               "?.innerText.trim() === text", arg=text, timeout=10000)

    def chat_requests(self):
        """What the page sent to be answered: its GET /v1/models, for the model list, is not one."""
        return [received for received in self.upstream.requests if received.method == "POST"]


class BrowserChatTest(BrowserTestCase):
    def test_reply_streams_in_token_by_token(self):
        first, second = threading.Event(), threading.Event()
        self.addCleanup(first.set)
        self.addCleanup(second.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="Hello"), first,
                                             chunk(content=" streaming"), second] + reply(" world")[1:])
        page = self.open_page()
        self.send(page, "Say hello")
        self.wait_for_reply(page, "Hello")  # an intermediate state: the rest is still held upstream
        self.assertEqual(page.inner_text(".message.assistant .meta"), "")
        first.set()
        self.wait_for_reply(page, "Hello streaming")
        second.set()
        self.wait_for_reply(page, "Hello streaming world")
        self.wait_for_stats(page)
        self.assertRegex(page.inner_text(".message.assistant .meta"),
                         r"^first token \d+\.\d\d s · \d+\.\d tokens/s · 3 in, 2 out$")  # usage from event:done
        self.assertTrue(page.is_visible("#send"))
        self.assertEqual(self.chat_requests()[0].json()["messages"], [{"role": "user", "content": "Say hello"}])
        self.upstream.script = Script(steps=reply("Again"))
        self.send(page, "Once more")
        self.wait_for_reply(page, "Again")
        self.assertEqual([m["role"] for m in self.chat_requests()[1].json()["messages"]],
                         ["user", "assistant", "user"])
        self.assertEqual(self.chat_requests()[1].json()["messages"][1]["content"], "Hello streaming world")
        self.assertEqual(self.page_errors, [])

    def test_shift_enter_adds_a_line_and_enter_sends(self):
        page = self.open_page()
        page.fill("#input", "first line")
        page.press("#input", "Shift+Enter")
        page.type("#input", "second line")
        self.assertEqual(page.input_value("#input"), "first line\nsecond line")
        self.assertEqual(self.chat_requests(), [])
        page.press("#input", "Enter")
        self.wait_for_reply(page, "Hello world")
        self.assertEqual(self.chat_requests()[0].json()["messages"][0]["content"], "first line\nsecond line")

    def test_stop_aborts_and_the_upstream_is_closed(self):
        # An upstream that goes on writing, as a model does, and learns of the close only from a write.
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"),
                                             *[0.4, b": still thinking\n\n"] * 20])
        page = self.open_page()
        self.send(page, "Think for a long time")
        self.wait_for_reply(page, "partial")
        page.click("#stop")
        stopped = time.monotonic()
        self.assertTrue(self.upstream.disconnected.wait(2), "the upstream was not closed after Stop")
        self.assertLess(time.monotonic() - stopped, 0.5)  # as a raw client that closes its socket
        page.wait_for_selector(".message.assistant .note")
        self.assertEqual(page.inner_text(".message.assistant .note"), "Stopped.")
        self.assertTrue(page.is_visible("#send"))
        page.click("#new-chat")
        self.assertEqual(page.locator(".message").count(), 0)

    def test_model_output_is_never_run(self):
        attack = ("<img src=x onerror=alert(1)> <script>alert(2)</script> "
                  "[click](javascript:alert(3)) [ok](https://example.com/a) **bold**")
        self.upstream.script = Script(steps=reply(attack))
        page = self.open_page()
        self.send(page, "Attack me")
        self.wait_for_stats(page)
        body = page.locator(".message.assistant .body")
        self.assertIn("<img src=x onerror=alert(1)>", body.inner_text())
        self.assertIn("<script>alert(2)</script>", body.inner_text())
        self.assertEqual(body.locator("img, script").count(), 0)
        links = body.locator("a")
        self.assertEqual(links.count(), 1)
        self.assertEqual(links.get_attribute("href"), "https://example.com/a")
        self.assertEqual(links.get_attribute("rel"), "noopener noreferrer")
        self.assertEqual(body.locator("strong").inner_text(), "bold")
        page.wait_for_timeout(300)  # give an onerror handler the chance it must not get
        self.assertEqual(self.dialogs, [])
        self.assertEqual(self.page_errors, [])

    def test_code_blocks_get_a_copy_button(self):
        self.upstream.script = Script(steps=reply("Here:\n\n```python\nprint('<b>')\n```\n\n- one\n- two"))
        page = self.open_page()
        self.send(page, "Code please")
        page.wait_for_selector(".message.assistant .code pre code")
        self.assertEqual(page.inner_text(".message.assistant .code pre code"), "print('<b>')")
        self.assertTrue(page.is_visible(".message.assistant .code .copy"))
        self.assertEqual(page.locator(".message.assistant li").count(), 2)

    def test_errors_show_in_the_conversation(self):
        self.upstream.script = json_script({"error": {"message": "This model's maximum context length is 8192",
                                                      "type": "invalid_request_error"}}, status=400)
        page = self.open_page()
        self.send(page, "Too long")
        page.wait_for_selector(".message.assistant .error")
        self.assertEqual(page.inner_text(".message.assistant .error"),
                         "Error 400: This model's maximum context length is 8192")
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="half"),
                                             sse({"error": {"message": "overloaded", "type": "server_error"}})])
        self.send(page, "Again")
        page.wait_for_selector(".message.assistant:last-of-type .error")
        self.assertEqual(page.inner_text(".message.assistant:last-of-type .error"), "overloaded")
        self.stop_server()  # the proxy goes away: the next send cannot connect
        self.send(page, "Anyone there?")
        page.wait_for_selector(".message.assistant:last-of-type .error")
        self.assertIn("Lost the connection to the proxy", page.inner_text(".message.assistant:last-of-type .error"))

    def test_sse_parser_handles_frames_split_anywhere(self):
        page = self.open_page()
        stream = ('event:message\r\ndata:{"content":"caf\u00e9"}\r\n\r\n: keep-alive\n\n'
                  'event: done\rdata: {"usage":null}\r\r')
        result = page.evaluate("""async (stream) => {
            const { SSEParser } = await import('/ui/sse.js');
            const parser = new SSEParser();
            const whole = [...parser.feed(stream), ...parser.end()];
            const split = new SSEParser();
            const pieces = [...[...stream].flatMap(character => split.feed(character)), ...split.end()];
            return { whole, pieces };
        }""", stream)
        want = [{"event": "message", "data": '{"content":"caf\u00e9"}'}, {"event": "done", "data": '{"usage":null}'}]
        self.assertEqual(result["whole"], want)
        self.assertEqual(result["pieces"], want)

    def test_keyboard_and_labels(self):
        page = self.open_page()
        page.click("h1")  # a user clicks the page top: Tab starts from there
        order = []
        for _ in range(6):
            page.keyboard.press("Tab")
            order.append(page.evaluate("() => document.activeElement.id"))
        self.assertEqual(order, ["theme", "new-chat", "system-toggle", "model", "input", "send"])
        self.assertEqual(page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle"), "solid")
        self.assertEqual(page.get_attribute("#model-field", "hidden"), None)
        self.assertTrue(page.locator("label[for=input]").count())
        self.send(page, "Hi")
        self.wait_for_reply(page, "Hello world")
        self.assertEqual(page.get_attribute(".message.assistant .body", "aria-live"), "polite")

    def test_screenshots_phone_and_desktop(self):
        self.upstream.script = lambda received: Script(steps=reply(
            "Streaming works. Here is **bold**, `code` and a list:\n\n- first\n- second\n\n"
            "```js\nconsole.log('hi');\n```"))
        for name, width, height in (("phone", 360, 740), ("desktop", 1280, 800)):
            with self.subTest(name=name):
                page = self.open_page(width, height)
                self.send(page, "Show me what you can do")
                self.wait_for_stats(page)
                self.assertLessEqual(page.evaluate("() => document.documentElement.scrollWidth"), width)
                path = os.path.join(SCREENSHOTS, f"ui-{name}.png")
                page.screenshot(path=path)
                self.assertGreater(os.path.getsize(path), 5000)


class BrowserConversationsTest(BrowserTestCase):
    """Conversations kept in the browser: a side list, newest first, that a reload and a new tab show."""

    def titles(self, page):
        return page.locator("#conversations .open").all_inner_texts()

    def chat(self, page, text, answer):
        self.upstream.script = Script(steps=reply(answer))
        self.send(page, text)
        self.wait_for_reply(page, answer)
        self.wait_for_stats(page)

    def seed(self, page, count):
        """count conversations kept in this browser, as the page keeps them, with long titles; then a reload."""
        page.evaluate("""count => localStorage.setItem('proxy-chat-conversations', JSON.stringify(
            Array.from({ length: count }, (_, i) => ({ id: 'c' + i, title: 'Conversation number ' + i + ' about streams',
              updated: count - i, messages: [{ role: 'user', content: 'q' + i }, { role: 'assistant', content: 'a' }] }))))""",
                      count)
        page.reload()
        page.wait_for_function("() => document.activeElement?.id === 'input'")

    def test_the_keyboard_reaches_the_message_box_past_a_long_list(self):
        page = self.open_page()
        self.seed(page, 12)
        page.click("h1")  # the top of the page: keyboard navigation goes on from there
        page.keyboard.press("Shift+Tab")  # the skip link is the page's first stop
        self.assertEqual(page.evaluate("() => document.activeElement.id"), "skip")
        self.assertGreaterEqual(page.locator("#skip").bounding_box()["y"], 0)  # shown once focused
        page.keyboard.press("Enter")
        self.assertEqual(page.evaluate("() => document.activeElement.id"), "input")
        tabs = {}
        for count in (12, 2):  # without the skip link too: the list is one stop, however long
            self.seed(page, count)
            page.click("h1")
            for tabs[count] in range(1, 40):
                page.keyboard.press("Tab")
                if page.evaluate("() => document.activeElement.id") == "input":
                    break
        self.assertEqual(tabs[12], tabs[2])
        self.assertLessEqual(tabs[12], 11)  # the bar, New chat, the list, its buttons, the messages' ones, the settings
        focused = page.evaluate("() => { const s = getComputedStyle(document.activeElement);"
                                " return [s.outlineStyle, s.boxShadow, s.borderColor]; }")
        page.evaluate("() => document.activeElement.blur()")
        unfocused = page.evaluate("() => { const s = getComputedStyle(document.getElementById('input'));"
                                  " return [s.outlineStyle, s.boxShadow, s.borderColor]; }")
        self.assertEqual(focused[0], "solid")  # a visible ring ...
        self.assertNotEqual(focused[1:], unfocused[1:])  # ... and the box itself changes
        self.seed(page, 12)
        page.focus("#conversations li[aria-current] .open")
        page.keyboard.press("ArrowDown")
        self.assertEqual(page.evaluate("() => document.activeElement.textContent"), "Conversation number 1 about streams")
        page.keyboard.press("Enter")  # opens it, and the message box has the focus
        self.assertEqual(page.evaluate("() => document.activeElement.id"), "input")
        self.assertEqual(page.inner_text(".message.user .body"), "q1")

    def test_titles_get_the_row_and_the_buttons_show_on_hover_focus_or_touch(self):
        page = self.open_page()
        self.seed(page, 12)
        current = page.locator("#conversations li[aria-current]")
        self.assertFalse(current.locator(".small").first.is_visible())  # not hovered, not focused
        self.assertGreater(current.locator(".open").bounding_box()["width"], 0.9 * current.bounding_box()["width"])
        current.hover()
        self.assertTrue(current.locator("text=Rename").is_visible())
        page.mouse.move(900, 700)
        page.focus("#conversations li:nth-child(3) .open")
        self.assertTrue(page.locator("#conversations li:nth-child(3) >> text=Delete").is_visible())
        touch = self.browser.new_context(viewport={"width": 1280, "height": 800}, has_touch=True, is_mobile=True)
        self.addCleanup(touch.close)
        phone = touch.new_page()
        phone.goto(f"http://127.0.0.1:{self.port}/")
        self.seed(phone, 3)
        self.assertTrue(phone.evaluate("() => matchMedia('(hover: none)').matches"))
        self.assertEqual(phone.locator("#conversations .small:visible").count(), 6)  # always, on a touch screen

    def test_conversations_survive_a_reload_and_show_in_a_new_tab(self):
        page = self.open_page()
        self.chat(page, "How do **streams** work?", "One token at a time")
        self.chat(page, "And errors?", "As an error frame")
        page.click("#new-chat")
        self.assertEqual(page.locator(".message").count(), 0)
        self.chat(page, "A second chat", "Hello again")
        self.assertEqual(self.titles(page), ["A second chat", "How do streams work?"])  # newest first
        page.reload()
        page.wait_for_selector("#conversations .open")
        self.assertEqual(self.titles(page), ["A second chat", "How do streams work?"])
        self.assertEqual(page.locator(".message .body").all_inner_texts(), ["A second chat", "Hello again"])
        page.click("#conversations li:nth-child(2) .open")
        self.assertEqual(page.locator(".message .body").all_inner_texts(),
                         ["How do streams work?", "One token at a time", "And errors?", "As an error frame"])
        self.chat(page, "Go on", "Continued")  # the conversation goes on where it was, and moves to the top
        self.assertEqual([m["content"] for m in self.chat_requests()[-1].json()["messages"]],
                         ["How do **streams** work?", "One token at a time", "And errors?", "As an error frame",
                          "Go on"])
        self.assertEqual(self.titles(page), ["How do streams work?", "A second chat"])
        tab = page.context.new_page()
        tab.goto(f"http://127.0.0.1:{self.port}/")
        tab.wait_for_selector("#conversations .open")
        self.assertEqual(self.titles(tab), ["How do streams work?", "A second chat"])
        self.assertEqual(self.page_errors, [])

    def test_rename_and_delete(self):
        page = self.open_page()
        self.chat(page, "First", "one")
        page.click("#new-chat")
        self.chat(page, "Second", "two")
        page.hover("#conversations li:nth-child(1)")  # its buttons show on hover (or focus)
        page.click("#conversations li:nth-child(1) .small:text('Rename')")
        page.fill("#conversations input", "My renamed chat")
        page.press("#conversations input", "Enter")
        self.assertEqual(self.titles(page), ["My renamed chat", "First"])
        page.reload()
        page.wait_for_selector("#conversations .open")
        self.assertEqual(self.titles(page), ["My renamed chat", "First"])
        page.hover("#conversations li:nth-child(1)")
        page.click("#conversations li:nth-child(1) .small:text('Delete')")  # the one on screen
        self.assertEqual(self.titles(page), ["First"])
        self.assertEqual(page.locator(".message").count(), 0)
        page.reload()
        page.wait_for_selector("#conversations .open")
        self.assertEqual(self.titles(page), ["First"])
        self.assertEqual(page.locator(".message .body").all_inner_texts(), ["First", "one"])

    def test_a_stopped_reply_is_kept_marked_as_stopped(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"), HANG])
        page = self.open_page()
        self.send(page, "Think for long")
        self.wait_for_reply(page, "partial")
        page.click("#stop")
        page.wait_for_selector(".message.assistant .note")
        page.reload()
        page.wait_for_selector(".message.assistant .note")
        self.assertEqual(page.inner_text(".message.assistant .body p:first-child"), "partial")
        self.assertEqual(page.inner_text(".message.assistant .note"), "Stopped.")

    def test_without_storage_the_chat_works_for_the_session_and_says_so(self):
        context = self.browser.new_context(viewport={"width": 1280, "height": 800})
        self.addCleanup(context.close)
        context.add_init_script("Storage.prototype.setItem = function () { "
                                "throw new DOMException('full', 'QuotaExceededError'); };")
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://127.0.0.1:{self.port}/")
        page.wait_for_function("() => document.activeElement?.id === 'input'")
        self.chat(page, "Hello", "Hello world")
        self.assertTrue(page.is_visible("#storage-note"))
        self.assertIn("lasts until the page is closed", page.inner_text("#storage-note"))
        self.assertEqual(self.titles(page), ["Hello"])  # listed for this session
        self.assertEqual(errors, [])


CONTRAST_SCRIPT = """() => {
  const rgb = (text) => text.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number);
  const luminance = (text) => {
    const [r, g, b] = rgb(text).map((value) => {
      const c = value / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (light + 0.05) / (dark + 0.05);
  };
  const style = (selector) => getComputedStyle(document.querySelector(selector));
  const page = style("body").backgroundColor;
  return { background: style("body").backgroundColor, text: ratio(style("body").color, page),
           muted: ratio(style(".message .meta").color, page), error: ratio(style(".error").color, page),
           button: ratio(style("#send").color, style("#send").backgroundColor) };
}"""


class BrowserProductTest(BrowserTestCase):
    """The chat page as a small product: retry and edit, copy, models from the server, a system prompt,
    errors a user understands, dark mode, a phone, the keyboard, the key, and its size."""

    def chat(self, page, text, answer):
        self.upstream.script = Script(steps=reply(answer))
        self.send(page, text)
        self.wait_for_reply(page, answer)
        self.wait_for_stats(page)

    def sent(self, index=-1):
        return [message["content"] for message in self.chat_requests()[index].json()["messages"]]

    def test_retry_and_edit(self):
        page = self.open_page()
        self.chat(page, "First question", "First answer")
        self.chat(page, "Second question", "Second answer")
        self.upstream.script = Script(steps=reply("Second answer, again"))
        page.click(".message.assistant:last-of-type .actions button:text('Retry')")
        self.wait_for_reply(page, "Second answer, again")
        self.assertEqual(self.sent(), ["First question", "First answer", "Second question"])
        self.assertEqual(page.locator(".message.assistant").count(), 2)  # the old reply was replaced
        page.click(".message.user:first-of-type .actions button:text('Edit')")
        self.assertEqual(page.input_value("#input"), "First question")
        self.assertTrue(page.is_visible("#editing"))
        page.fill("#input", "A better first question")
        self.upstream.script = Script(steps=reply("A better answer"))
        page.press("#input", "Enter")
        self.wait_for_reply(page, "A better answer")
        self.assertEqual(self.sent(), ["A better first question"])  # what followed it is gone
        self.assertEqual(page.locator(".message .body").all_inner_texts(), ["A better first question",
                                                                             "A better answer"])
        self.assertFalse(page.is_visible("#editing"))

    def test_copy_puts_the_reply_on_the_clipboard(self):
        page = self.open_page()
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        self.upstream.script = Script(steps=reply("Some **bold** text"))
        self.send(page, "Copy me")
        self.wait_for_reply(page, "Some bold text")
        self.wait_for_stats(page)
        page.click(".message.assistant .actions button:text('Copy')")
        self.assertEqual(page.evaluate("() => navigator.clipboard.readText()"), "Some **bold** text")  # as written
        self.upstream.script = Script(steps=reply("```python\nprint(1)\n```"))
        self.send(page, "Code")
        page.wait_for_selector(".message.assistant:nth-of-type(4) .code code")
        self.assertEqual(page.inner_text(".message.assistant:last-of-type .code code"), "print(1)")
        self.assertEqual(page.get_attribute(".message.assistant:last-of-type .code code", "data-language"), "python")
        page.click(".message.assistant:last-of-type .code .copy")
        self.assertEqual(page.evaluate("() => navigator.clipboard.readText()"), "print(1)")

    def test_headings_and_tables_render_and_html_stays_text(self):
        self.upstream.script = Script(steps=reply(
            "## Plan\n\n| name | <b>value</b> |\n|---|---|\n| `a` | [x](javascript:alert(1)) |\n"
            "| **b** | <img src=x onerror=alert(2)> |\n\n```js\nlet a = 1;\n```"))
        page = self.open_page()
        self.send(page, "Format")
        self.wait_for_stats(page)
        body = page.locator(".message.assistant .body")
        self.assertEqual(body.locator("h4").inner_text(), "Plan")
        self.assertEqual(body.locator("th").all_inner_texts(), ["name", "<b>value</b>"])
        self.assertEqual(body.locator("td").all_inner_texts(), ["a", "[x](javascript:alert(1))", "b",
                                                                "<img src=x onerror=alert(2)>"])
        self.assertEqual(body.locator("td code").inner_text(), "a")
        self.assertEqual(body.locator("img, a, script, b").count(), 0)
        self.assertEqual(body.locator(".code > span").inner_text(), "js")  # the language label, shown
        self.assertEqual(self.dialogs, [])

    def test_models_come_from_the_server_and_the_choice_is_remembered(self):
        self.upstream.model_list = None
        self.upstream.script = openai_like  # GET /v1/models lists gpt-4o-mini and text-embedding-3-small
        page = self.open_page()
        page.wait_for_selector("#model-choice:not([hidden])")
        self.assertEqual(page.locator("#model-select option").all_inner_texts(),
                         ["gpt-4o-mini", "text-embedding-3-small"])
        page.select_option("#model-select", "text-embedding-3-small")
        page.reload()
        page.wait_for_selector("#model-choice:not([hidden])")
        self.assertEqual(page.input_value("#model-select"), "text-embedding-3-small")
        self.upstream.script = Script(steps=reply("ok"))
        self.send(page, "Which model?")
        self.wait_for_reply(page, "ok")
        self.assertEqual(self.chat_requests()[-1].json()["model"], "text-embedding-3-small")

    def test_the_routed_models_are_listed_and_a_chat_with_one_goes_to_its_route(self):
        local = FakeUpstream().start()
        self.addCleanup(local.close)
        local.script = Script(steps=reply("from the local server"))
        self.server.config = with_routes(self.config, [
            {"models": ["local-llama", "mistral*"], "upstreams": [{"url": local.base_url}]}])
        self.upstream.model_list = ["gpt-4o-mini"]
        page = self.open_page()
        page.wait_for_selector("#model-choice:not([hidden])")
        self.assertEqual(page.locator("#model-select option").all_inner_texts(), ["gpt-4o-mini", "local-llama"])
        page.select_option("#model-select", "local-llama")
        self.send(page, "Hi")
        self.wait_for_reply(page, "from the local server")
        self.assertEqual(local.requests[-1].json()["model"], "local-llama")
        self.assertEqual(self.chat_requests(), [])  # nothing of the chat went to the default upstream

    def test_a_system_prompt_per_conversation(self):
        page = self.open_page()
        self.assertFalse(page.is_visible("#system"))  # folded away
        page.click("#system-toggle")
        page.fill("#system", "Answer in French.")
        self.chat(page, "Hello", "Bonjour")
        self.assertEqual(self.chat_requests()[-1].json()["messages"][0], {"role": "system",
                                                                            "content": "Answer in French."})
        page.click("#new-chat")
        self.assertEqual(page.input_value("#system"), "")
        page.click("#conversations li:nth-child(1) .open")  # the new chat is listed once it has a message
        self.assertEqual(page.input_value("#system"), "Answer in French.")

    def test_a_429_says_when_to_try_again_and_a_lost_connection_can_be_retried(self):
        self.upstream.script = json_script({"error": {"message": "Rate limit reached", "type": "requests"}},
                                           status=429, headers={"Retry-After": "20"})
        page = self.open_page()
        self.send(page, "Too fast")
        page.wait_for_selector(".message.assistant .error")
        self.assertEqual(page.inner_text(".message.assistant .error"),
                         "Error 429: Rate limit reached Try again in 20 s.")
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="cut"), ABORT])
        page.click(".message.assistant .actions button:text('Retry')")
        page.wait_for_selector(".message.assistant:last-of-type .error")  # the stream broke: an error, and Retry
        self.assertEqual(page.inner_text(".message.assistant:last-of-type .body p:first-child"), "cut")
        self.upstream.script = Script(steps=reply("whole"))
        page.click(".message.assistant:last-of-type .actions button:text('Retry')")
        self.wait_for_reply(page, "whole")

    def test_escape_stops_a_reply(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="partial"), HANG])
        page = self.open_page()
        self.send(page, "Long")
        self.wait_for_reply(page, "partial")
        page.keyboard.press("Escape")
        self.assertTrue(self.upstream.disconnected.wait(2))
        page.wait_for_selector(".message.assistant .note")

    def test_dark_mode_follows_the_system_and_the_toggle_and_both_read_well(self):
        colours = {}
        for scheme in ("light", "dark"):
            context = self.browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme=scheme)
            self.addCleanup(context.close)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{self.port}/")
            page.wait_for_function("() => document.activeElement?.id === 'input'")
            self.upstream.script = json_script({"error": {"message": "bad"}}, status=400)
            self.send(page, "An error, for its colour")
            page.wait_for_selector(".message.assistant .error")
            self.chat(page, "Hello", "Hello world")
            found = page.evaluate(CONTRAST_SCRIPT)
            colours[scheme] = found["background"]
            for part in ("text", "muted", "error", "button"):
                self.assertGreaterEqual(found[part], 4.5, f"{scheme} {part}: WCAG AA needs 4.5:1")
            page.screenshot(path=os.path.join(SCREENSHOTS, f"ui-{scheme}-desktop.png"))  # docs/ui-{scheme}.png
            page.set_viewport_size({"width": 360, "height": 740})
            page.screenshot(path=os.path.join(SCREENSHOTS, f"ui-{scheme}-phone.png"))
            if scheme == "light":
                page.set_viewport_size({"width": 1280, "height": 800})
                page.click("#theme")  # dark, by the toggle, kept across a reload
                page.reload()
                page.wait_for_function("() => document.activeElement?.id === 'input'")
                self.assertEqual(page.evaluate("() => document.documentElement.dataset.theme"), "dark")
                toggled = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        self.assertNotEqual(colours["light"], colours["dark"])
        self.assertEqual(toggled, colours["dark"])

    def test_a_phone_folds_the_list_and_keeps_the_input_reachable(self):
        page = self.open_page(360, 740)
        self.chat(page, "On a phone", "Small screen")
        self.assertFalse(page.is_visible("#history"))
        self.assertTrue(page.is_visible("#history-toggle"))
        box = page.locator("#input").bounding_box()
        self.assertLessEqual(box["y"] + box["height"], 740)
        self.assertLessEqual(page.evaluate("() => document.documentElement.scrollWidth"), 360)
        page.click("#history-toggle")
        self.assertTrue(page.is_visible("#conversations .open"))
        page.click("#conversations .open")
        self.assertFalse(page.is_visible("#history"))

    def test_every_control_has_a_label_and_ui_stays_small(self):
        page = self.open_page()
        self.chat(page, "Hi", "Hello")
        unlabeled = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea')]
            .filter((node) => node.offsetParent !== null)
            .filter((node) => !(node.labels?.length || node.getAttribute('aria-label') || node.textContent.trim()))
            .map((node) => node.id || node.outerHTML.slice(0, 60))""")
        self.assertEqual(unlabeled, [])
        lines = 0
        for name in os.listdir(os.path.join(HERE, "ui")):
            with open(os.path.join(HERE, "ui", name), encoding="utf-8") as source:
                lines += len(source.readlines())
        self.assertLess(lines, 1500)

    def test_the_key_is_kept_for_the_session_only_and_can_be_forgotten(self):
        page = self.open_page()
        page.evaluate("() => { document.getElementById('key-field').hidden = false; }")
        page.fill("#key", "a-key-for-this-session-only")
        self.assertEqual(page.evaluate("() => sessionStorage.getItem('proxy-key')"), "a-key-for-this-session-only")
        self.assertNotIn("a-key-for-this-session-only",
                         page.evaluate("() => JSON.stringify(Object.entries(localStorage))"))
        page.click("#forget-key")
        self.assertEqual(page.evaluate("() => sessionStorage.getItem('proxy-key')"), None)
        self.assertEqual(page.input_value("#key"), "")

    def test_the_page_asks_nothing_of_any_other_origin(self):
        origins = []
        context = self.browser.new_context()
        self.addCleanup(context.close)
        page = context.new_page()
        page.on("request", lambda request: origins.append(request.url.split("/")[2]))
        page.goto(f"http://127.0.0.1:{self.port}/")
        page.wait_for_function("() => document.activeElement?.id === 'input'")
        self.chat(page, "Hi", "Hello")
        self.assertEqual(set(origins), {f"127.0.0.1:{self.port}"})


class BrowserDemoTest(BrowserTestCase):
    """The chat page in front of the real --demo upstream: what the README's quick start shows."""

    def setUp(self):
        demo = proxy.DemoUpstream(word_delay=0.01)
        demo.start()
        self.addCleanup(demo.close)
        self.config = make_config(base_url=demo.base_url, api_key="demo-key-not-secret", demo=True)
        self.server = proxy.ProxyServer(self.config)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        self.addCleanup(self.stop_server)
        self.port = self.server.server_port

    def test_the_demo_echoes_word_by_word_and_the_quick_start_screenshot(self):
        text = "Hello from the **demo**: your words stream back one by one, `code` and all."
        page = self.open_page(1280, 600)
        self.send(page, text)
        self.wait_for_reply(page, "Hello from the demo: your words stream back one by one, code and all.")
        self.wait_for_stats(page)
        self.assertEqual(page.inner_text(".message.assistant:last-of-type .body strong"), "demo")
        path = os.path.join(SCREENSHOTS, "quick-start-demo.png")  # docs/screenshot.png is a copy of it
        page.screenshot(path=path)
        self.assertGreater(os.path.getsize(path), 5000)
        self.assertEqual(self.page_errors, [])


class BrowserSettingsTest(BrowserTestCase):
    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),), "allowed_models": ("gpt-4o-mini", "gpt-4o")}

    def test_key_field_and_model_choice(self):
        page = self.open_page()
        page.wait_for_selector("#key-field:not([hidden])")
        self.assertEqual(page.locator("#model-select option").all_inner_texts(), ["gpt-4o-mini", "gpt-4o"])
        page.select_option("#model-select", "gpt-4o")
        self.send(page, "No key yet")
        page.wait_for_selector(".message.assistant .error")
        self.assertEqual(page.inner_text(".message.assistant .error"),
                         "Error 401: This proxy needs a client key: enter yours in the Key field above.")
        page.fill("#key", "not-a-key-of-this-proxy-0123")
        self.send(page, "A wrong key")
        page.wait_for_selector(".message.assistant:last-of-type .error")
        wrong = page.inner_text(".message.assistant:last-of-type .error")
        self.assertIn("The key in the Key field was not accepted", wrong)
        self.assertNotIn("Authorization", wrong)  # the page's words, not the API's
        page.fill("#key", ALICE_KEY)
        self.send(page, "With a key")
        self.wait_for_reply(page, "Hello world")
        self.assertEqual(self.upstream.requests[0].json()["model"], "gpt-4o")
        self.assertEqual(page.evaluate("() => sessionStorage.getItem('proxy-key')"), ALICE_KEY)



BROWSER_REALTIME_SCRIPT = """
([url, key]) => new Promise((resolve, reject) => {
  const socket = new WebSocket(url, ['realtime', 'openai-insecure-api-key.' + key]);
  let text = '';
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: 'conversation.item.create', item: { type: 'message', role: 'user',
      content: [{ type: 'input_text', text: 'from the browser' }] } }));
    socket.send(JSON.stringify({ type: 'response.create' }));
  };
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === 'response.output_text.delta') text += event.delta;
    if (event.type === 'response.done') {
      resolve({ text, protocol: socket.protocol, extensions: socket.extensions,
                tokens: event.response.usage.total_tokens });
      socket.close(1000);
    }
  };
  socket.onclose = (event) => reject(new Error('closed ' + event.code + ' ' + event.reason));
})
"""


class RealtimeBrowserTest(RealtimeTestCase, BrowserTestCase):
    """Chromium opens the WebSocket from the proxy's own page, its key in the subprotocol."""

    config_overrides = {"proxy_api_keys": (("alice", ALICE_KEY),), "cors_origins": ("https://app.example",)}

    def test_a_browser_session_with_its_key_in_the_subprotocol(self):
        self.realtime.session = sdk_like_session
        page = self.open_page()
        result = page.evaluate(BROWSER_REALTIME_SCRIPT, [f"ws://127.0.0.1:{self.port}/v1/realtime?model=gpt-realtime",
                                                         ALICE_KEY])
        self.assertEqual(result, {"text": "from the browser", "protocol": "realtime", "extensions": "",
                                  "tokens": 9})
        headers = self.realtime.handshakes[0][1]
        self.assertEqual(headers["sec-websocket-protocol"], ["realtime"])
        self.assertEqual(headers["authorization"], [f"Bearer {TEST_KEY}"])
        self.assertNotIn(ALICE_KEY, json.dumps(headers))
        self.assertEqual(self.page_errors, [])


# --------------------------------------------------------------------------
# Behind nginx: the README's own server block
# --------------------------------------------------------------------------

def readme_nginx_block():
    """The nginx configuration the README's "Behind nginx" section shows, as written."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        section = readme.read().split("## Behind nginx", 1)[1]
    return re.search(r"```nginx\n(.*?)```", section, re.S).group(1)


def healthz_answers(port):
    """True once GET /healthz on the port answers 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_nginx(test, proxy_ports):
    """Debian's nginx on loopback with the README's block, in front of the proxies on proxy_ports; its port."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    require(nginx, "Debian's nginx")
    block = readme_nginx_block()
    test.assertIn("server 127.0.0.1:8080;", block)
    test.assertIn("listen 80;", block)
    port = free_port()
    block = block.replace("server 127.0.0.1:8080;", " ".join(f"server 127.0.0.1:{each};" for each in proxy_ports))
    block = block.replace("listen 80;", f"listen 127.0.0.1:{port};")
    folder = tempfile.mkdtemp(prefix="proxy-nginx-")
    test.addCleanup(shutil.rmtree, folder, True)
    conf = os.path.join(folder, "nginx.conf")
    temp = {name: os.path.join(folder, name) for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    with open(conf, "w") as out:
        out.write(f"daemon off;\nuser root;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
                  f"error_log {folder}/error.log;\nevents {{}}\nhttp {{\naccess_log off;\n"
                  f"client_body_temp_path {temp['body']};\nproxy_temp_path {temp['proxy']};\n"
                  f"fastcgi_temp_path {temp['fastcgi']};\nuwsgi_temp_path {temp['uwsgi']};\n"
                  f"scgi_temp_path {temp['scgi']};\n{block}\n}}\n")
    process = subprocess.Popen([nginx, "-c", conf, "-p", folder], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop():
        process.terminate()
        process.wait(10)
        process.stderr.close()

    test.addCleanup(stop)
    test.assertTrue(wait_until(lambda: healthz_answers(port)), "nginx did not start")
    return port


class NginxTest(ProxyTestCase):
    """Debian's nginx on loopback, in front of the proxy, with the README's block."""

    def setUp(self):
        super().setUp()
        self.nginx_port = start_nginx(self, [self.port])

    def through_nginx(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx_port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def test_message_stream_arrives_frame_by_frame(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="first"), hold]
                                      + reply("rest")[1:])
        _, response = self.through_nginx("/message", chat_body())
        reader = FrameReader(response)
        reader.next_frame()
        self.assertIn('"content":"first"', reader.next_frame())  # while the upstream still holds the rest
        self.assertFalse(hold.is_set())
        hold.set()
        self.assertEqual(parse_frames(reader.rest())[-1][0], "done")

    def test_v1_stream_arrives_event_by_event(self):
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(content="first"), hold, DONE])
        _, response = self.through_nginx("/v1/chat/completions", b'{"stream": true, "stream_options": '
                                                                  b'{"include_usage": true}}')
        self.assertEqual(response.read1(65536), chunk(content="first"))
        self.assertFalse(hold.is_set())
        hold.set()
        self.assertEqual(response.read(), DONE)

    def test_a_client_leaving_through_nginx_closes_the_upstream(self):
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="a"), HANG])
        conn, response = self.through_nginx("/message", chat_body())
        self.assertIn('"content":""', FrameReader(response).next_frame())
        conn.close()
        self.assertTrue(self.upstream.disconnected.wait(3), "the upstream was not closed after the client left")


class RealtimeNginxTest(RealtimeTestCase):
    """The README's nginx block relays the Realtime API's WebSocket too."""

    def test_a_session_through_nginx(self):
        nginx_port = start_nginx(self, [self.port])
        status_line, head, peer = self.handshake(port=nginx_port)
        self.assertIn(" 101 ", status_line)
        self.assertEqual(peer.recv_json()["type"], "session.created")
        peer.send_json({"text": "through nginx"})
        self.assertEqual(peer.recv_json()["delta"], "through nginx")
        self.assertEqual(peer.recv_json()["type"], "response.done")
        peer.send(0x8, struct.pack("!H", 1000))
        self.assertEqual(peer.recv_close(), (1000, ""))
        self.assertEqual(self.realtime.handshakes[0][1]["authorization"], [f"Bearer {TEST_KEY}"])


# --------------------------------------------------------------------------
# The container: the Dockerfile built with buildah and run as its config says
# --------------------------------------------------------------------------

BUILDAH = ["buildah", "--storage-driver", "vfs"]
BASE_IMAGE = "docker.io/library/python:3.12-slim"  # .ci/run makes a stand-in with debootstrap


def buildah(*args, **kwargs):
    return subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=300, **kwargs)


def find_process(port):
    """The pid of the proxy.py process serving on this port (chroot isolation shares our pid space)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline, open(f"/proc/{entry}/environ", "rb") as environ:
                if b"proxy.py" in cmdline.read() and f"PORT={port}\0".encode() in environ.read():
                    return int(entry)
        except (OSError, ValueError):
            continue
    return None


class ContainerTest(unittest.TestCase):
    IMAGE = "localhost/openai-proxy-test"

    @classmethod
    def setUpClass(cls):
        require(shutil.which("buildah") and os.geteuid() == 0, "buildah, run as root")
        require(buildah("images", "-q", BASE_IMAGE).stdout.strip(),
                f"the {BASE_IMAGE} stand-in that .ci/run builds with debootstrap")
        built = buildah("bud", "--format", "docker", "--isolation", "chroot", "--pull-never", "-q",
                        "-t", cls.IMAGE, HERE)
        assert built.returncode == 0, built.stderr
        cls.config = json.loads(buildah("inspect", "--type", "image", cls.IMAGE).stdout)["Docker"]["config"]
        cls.container = buildah("from", "-q", cls.IMAGE).stdout.strip()

    @classmethod
    def tearDownClass(cls):
        buildah("rm", cls.container)
        buildah("rmi", cls.IMAGE)

    def run_in_container(self, command, env=(), **popen):
        """Run a command in the container as the image's USER, with its Env and these additions."""
        args = ["run", "--isolation", "chroot", "--network", "host", "--user", self.config["User"]]
        for item in list(self.config["Env"]) + [f"{name}={value}" for name, value in env]:
            args += ["--env", item]
        return subprocess.Popen([*BUILDAH, *args, self.container, "--", *command], **popen)

    def test_image_config(self):
        config = self.config
        self.assertEqual(config["Cmd"], ["python", "proxy.py"])  # exec form: proxy.py gets the signals
        self.assertNotIn(config["User"].split(":")[0], ("", "0", "root"))
        self.assertIn("HOST=0.0.0.0", config["Env"])
        self.assertIn("PORT=8080", config["Env"])
        self.assertEqual(config["WorkingDir"], "/app")
        self.assertEqual(list(config["ExposedPorts"]), ["8080/tcp"])
        self.assertEqual(config["Healthcheck"]["Test"][:2], ["CMD", "python"])
        self.assertIn("urllib.request", config["Healthcheck"]["Test"][-1])

    def test_image_holds_only_the_app(self):
        listing = self.run_in_container(["sh", "-c", "cd /app && find . | sort"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        files = listing.communicate(timeout=60)[0].split()
        want = [".", "./proxy.py", "./ui"] + sorted(f"./ui/{name}" for name in os.listdir(os.path.join(HERE, "ui")))
        self.assertEqual(files, sorted(want))

    def test_runs_as_configured_serves_and_drains_on_sigterm(self):
        port = free_port()
        proxy_run = self.run_in_container(self.config["Cmd"], env=[("PORT", port), ("DEMO", "true")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proxy_run.poll() is None and proxy_run.kill())
        self.addCleanup(proxy_run.stderr.close)
        self.assertTrue(wait_until(lambda: healthz_answers(port), 15), "the container's proxy did not start")
        pid = find_process(port)
        with open(f"/proc/{pid}/status") as status:
            uid = int(re.search(r"^Uid:\s+(\d+)", status.read(), re.M).group(1))
        self.assertEqual(uid, int(self.config["User"]))
        self.assertNotEqual(uid, 0)
        self.assertTrue(os.readlink(f"/proc/{pid}/cwd").endswith("/app"))
        check = self.config["Healthcheck"]["Test"][1:]
        self.assertEqual(self.run_in_container(check, env=[("PORT", port)]).wait(30), 0)
        self.assertNotEqual(self.run_in_container(check, env=[("PORT", free_port())],
                                                  stderr=subprocess.DEVNULL).wait(30), 0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        words = " ".join(f"word{i}" for i in range(30))  # 30 words at the demo's pace: a second and a half
        conn.request("POST", "/message", chat_body(words))
        reader = FrameReader(conn.getresponse())
        self.assertIn('"content":""', reader.next_frame())  # the role frame: every word is still to come
        os.kill(pid, signal.SIGTERM)  # what docker stop sends to the CMD
        frames = parse_frames(reader.rest())
        self.assertEqual("".join(self.contents_of(frames)).split(), words.split())  # drained, not cut
        self.assertEqual(frames[-1][0], "done")
        self.assertEqual(proxy_run.wait(30), 0)

    def contents_of(self, frames):
        return [data["content"] for event, data in frames if event == "message"]


class BenchmarkSmokeTest(unittest.TestCase):
    """bench_proxy.py still runs: one tiny scenario on each route (the numbers are its own business)."""

    def test_a_tiny_scenario(self):
        import bench_proxy
        bench_proxy.SCENARIOS["smoke"] = (3, 5, 0.01, 0.0)
        self.addCleanup(bench_proxy.SCENARIOS.pop, "smoke")
        for route in bench_proxy.ROUTES:
            with self.subTest(route=route):
                row = asyncio.run(bench_proxy.scenario("smoke", route, []))
                self.assertEqual((row["errors"], row["chunks"]), (0, 15), row["sample_error"])
                self.assertGreater(row["cpu_us_per_chunk"], 0)

    def patch(self, module, **values):
        for name, value in values.items():
            self.addCleanup(setattr, module, name, getattr(module, name))
            setattr(module, name, value)

    def test_a_tiny_workers_run_measures_both_layouts(self):
        require(hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2, "two cores")
        require(REDIS_SERVER, "Debian's redis-server")
        import bench_proxy
        self.patch(bench_proxy, WORKERS_ROUNDS=1, WORKERS_STREAMS=2, WORKERS_CHUNKS=5, WORKERS_CLIENTS=2,
                   WORKERS_SECONDS=0.3)
        self.addCleanup(os.sched_setaffinity, 0, os.sched_getaffinity(0))  # the scenario pins the harness
        rows = asyncio.run(bench_proxy.workers("/message", sorted(os.sched_getaffinity(0)), ()))
        self.assertEqual([(row["layout"], row["system"]) for row in rows], [
            (layout, system) for layout in ("pinned", "shared")
            for system in ("direct", "WORKERS=1", "WORKERS=2", "WORKERS=1+limits", "WORKERS=2+limits",
                           "WORKERS=2+redis")])
        for row in rows:
            self.assertEqual(row["errors"], 0, row)
            self.assertGreater(row["requests_per_s"], 0, row)
            if row["system"] != "direct":
                self.assertGreater(row["cpu_us_per_request"], 0, row)

    def test_a_tiny_rtt_run_keeps_its_upstream_connection(self):
        require(shutil.which("openssl"), "the openssl command (the bench makes its certificate with it)")
        import bench_proxy
        self.patch(bench_proxy, RTT_SEQUENTIAL=4, RTT_WAVE=3, RTT_DELAY=0.002)
        row = asyncio.run(bench_proxy.rtt("/v1/chat/completions", [], ()))
        self.assertEqual(row["errors"], 0, row["sample_error"])
        self.assertEqual((row["direct_opened"], row["opened"]), (1, 1), row)  # four requests, one connection
        self.assertLessEqual(row["wave1_opened"] + row["wave2_opened"], 3 + 1, row)
        self.assertGreater(row["direct_p50_ms"], 2 * 2)  # the relay's delay is there: two ways, 2 ms each

    def test_tiny_overload_keepalive_and_flood(self):
        import bench_proxy
        self.patch(bench_proxy, OVERLOAD=(6, 5, 0.1, 0.0), RAMP=0.05, KEEPALIVE=(2, 3, 0.0, 0.0),
                   KEEPALIVE_SECONDS=0.3, FLOOD_ATTACKERS=20,
                   FLOODS=("slowbody", "connections"))  # slowloris trickles as slowbody does
        row = asyncio.run(bench_proxy.overload("/message", [], ("--max-streams", "3")))
        self.assertEqual((row["served"], row["refused"], row["with_retry_after"], row["unanswered"]), (3, 3, 3, 0), row)
        self.assertEqual(row["healthz_failed"], 0)
        self.assertGreater(row["healthz_p50_ms"], 0)
        row = asyncio.run(bench_proxy.keepalive("/v1/chat/completions", [], ()))
        self.assertEqual(row["errors"], 0, row["sample_error"])
        self.assertGreater(row["requests"], 2)
        for row in asyncio.run(bench_proxy.flood([], ("--max-connections", "10"), seconds=0.5)):
            with self.subTest(flood=row["flood"]):
                self.assertGreater(row["probes"], 0)
                self.assertEqual(row["served"] + row["told_503"], row["probes"], row)

    def test_a_tiny_siege_with_wrk_and_slowhttptest(self):
        require(shutil.which("wrk") and shutil.which("slowhttptest"), "wrk and slowhttptest (Debian's packages)")
        require(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"), "Debian's nginx (the siege's reference)")
        import bench_proxy
        self.patch(bench_proxy, SIEGE_SLOW=40, SIEGE_SLOW_RATE=40, SIEGE_WRK=20)
        for system in ("proxy.py", "nginx"):
            with self.subTest(system=system):
                row = asyncio.run(bench_proxy.siege([], ("--max-connections", "30"), system, seconds=2.0))
                self.assertGreater(row["probes"], 0, row)
                self.assertEqual(row["no_answer"], 0, row)  # nginx relays /message to the upstream: "other"
                if system == "proxy.py":
                    self.assertEqual(row["served"] + row["told_503"], row["probes"], row)
                self.assertGreater(row["wrk_requests_per_s"], 0, row)

    def test_a_tiny_limits_run_asks_redis_once_per_decision(self):
        require(REDIS_SERVER, "Debian's redis-server")
        import bench_proxy
        self.patch(bench_proxy, KEEPALIVE=(2, 3, 0.0, 0.0), LIMITS_SECONDS=0.3)
        row = asyncio.run(bench_proxy.limits("/message", [], ()))
        self.assertEqual(row["errors"], 0, row["sample_error"])
        for name in ("direct", "none", "process", "redis", "redis_away"):
            self.assertGreater(row[f"{name}_requests"], 2, row)
        # admission, the stream slot and its release (the bench upstream reports no usage to record); give or
        # take the start's PING, each script's first EVAL, and the requests cut off when the run ends
        self.assertTrue(2.5 <= row["redis_trips_per_request"] <= 3.5, row)
        self.assertEqual(row["redis_away_unshared"], 0, row)

    def test_every_proxy_thread_is_pinned(self):
        # Threads inherit their creator's CPUs: the pool thread that starts the workers must be pinned too.
        require(hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task"),
                "Linux CPU affinity and /proc to pin the proxy's threads")
        import bench_proxy
        cpu = min(os.sched_getaffinity(0))
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        proxy_process = bench_proxy.ProxyProcess(upstream.server.server_address[1], cpu)
        self.addCleanup(proxy_process.stop)
        threads = os.listdir(f"/proc/{proxy_process.process.pid}/task")
        self.assertGreaterEqual(len(threads), 3)  # main, connection pool, stream supervisor
        for thread in threads:
            self.assertEqual(os.sched_getaffinity(int(thread)), {cpu}, f"thread {thread}")


# --------------------------------------------------------------------------
# The shape of proxy.py: small functions, a thin handler
# --------------------------------------------------------------------------

def github_slug(heading):
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


class DocsTest(unittest.TestCase):
    """The README and docs/ say what the code does: every setting and metric, nothing else, links that lead
    somewhere."""

    def read(self, path):
        with open(os.path.join(HERE, path), encoding="utf-8") as page:
            return page.read()

    def test_the_readme_is_a_front_door(self):
        lines = self.read("README.md").splitlines()
        self.assertLessEqual(len(lines), 310)
        for page in ("configuration", "api", "realtime-and-responses", "security", "reliability", "scaling",
                     "observability", "performance", "architecture", "tests"):
            self.assertIn(f"(docs/{page}.md)", "\n".join(lines))

    def test_every_setting_is_documented_and_nothing_else(self):
        rows = re.findall(r"^\| (`[A-Z][A-Z0-9_]*`.*?) \| `(--[a-z0-9-]+)` \|", self.read("docs/configuration.md"),
                          re.M)
        documented = {name for names, _ in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", names)}
        self.assertEqual(documented, {name for setting in proxy.SETTINGS for name in setting.envs})
        self.assertEqual({flag for _, flag in rows}, {setting.flag for setting in proxy.SETTINGS})

    def test_every_metric_is_documented_and_nothing_else(self):
        rows = re.findall(r"^\| `((?:proxy|process)_[a-z_]+)(?:\{[^}]*\})?` \|", self.read("docs/observability.md"),
                          re.M)
        self.assertEqual(set(rows), {name for name, _, _ in proxy.Metrics.FAMILIES})

    def test_every_relative_link_leads_to_a_page_and_heading(self):
        pages = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(HERE, "docs"))
                                       if name.endswith(".md"))
        anchors = {page: {github_slug(heading) for heading in re.findall(r"^#{1,6} (.*)$", self.read(page), re.M)}
                   for page in pages}
        for page in pages:
            for target in re.findall(r"\]\(([^)\s]+)\)", self.read(page)):
                if target.startswith(("http://", "https://")):
                    continue
                path, _, anchor = target.partition("#")
                linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                with self.subTest(page=page, target=target):
                    self.assertTrue(os.path.exists(os.path.join(HERE, linked)), linked)
                    if anchor and linked.endswith(".md"):
                        self.assertIn(anchor, anchors[linked])


class ShapeTest(unittest.TestCase):
    """What a newcomer can hold in their head: no function over 40 lines or of cyclomatic complexity over
    15, and a request handler of about 300 lines that reads, routes, writes and is the error boundary."""

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(HERE, "proxy.py"), encoding="utf-8") as source:
            cls.source = source.read()
        cls.tree = ast.parse(cls.source)

    def test_no_function_over_40_lines_and_a_thin_handler(self):
        long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(self.tree)
                if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40]
        self.assertEqual(long, [])
        handler = next(node for node in self.tree.body if isinstance(node, ast.ClassDef) and node.name == "ProxyHandler")
        self.assertLessEqual(handler.end_lineno - handler.lineno + 1, 320)

    def test_no_cyclomatic_complexity_over_15(self):
        require(cc_visit is not None, "radon (its cyclomatic complexity)")
        blocks = cc_visit(self.source)
        functions = [block for block in blocks if not hasattr(block, "methods")]
        functions += [method for block in blocks for method in getattr(block, "methods", [])]
        self.assertEqual([(block.name, block.complexity) for block in functions if block.complexity > 15], [])
        self.assertGreater(len(functions), 200)  # it measured the whole file

    def test_routes_are_one_table_of_functions(self):
        for route in proxy.ROUTES:
            self.assertTrue(callable(route.serve), route)
            self.assertIs(proxy.find_route(route.path), route, route.path)
        self.assertEqual({route.path for route in proxy.ROUTES if route.relays}, {"/message", proxy.PASSTHROUGH_PREFIX})


# --------------------------------------------------------------------------
# The real process: quick start, signals, drain
# --------------------------------------------------------------------------

class ProxyProcess:
    """python proxy.py in a subprocess, with its stderr collected line by line."""

    def __init__(self, *args, env=None, open_files=None, cores=None):
        base_env = {k: v for k, v in os.environ.items() if k not in ("OA_API_KEY", "OPENAI_API_KEY")}

        def in_the_child():  # before proxy.py starts: open files (soft, hard), the cores it may use
            if open_files:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)
            if cores:
                os.sched_setaffinity(0, cores)

        # A session of its own: kill() ends its workers too (WORKERS above 1), and a signal to the
        # group is what a terminal's Ctrl-C sends.
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "proxy.py"), "--port", "0", *args],
            env={**base_env, **(env or {})}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            preexec_fn=in_the_child if open_files or cores else None, start_new_session=True)
        self.lines = queue.Queue()
        self.log = []
        self.collector = threading.Thread(target=self._collect, daemon=True)
        self.collector.start()
        self.port = int(self.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1))

    def _collect(self):
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern, limit=10.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {self.log}")

    def signal(self, signum):
        self.process.send_signal(signum)

    def wait(self, limit=15):
        return self.process.wait(limit)

    def signal_group(self, signum):
        os.killpg(self.process.pid, signum)

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        self.collector.join(5)  # it ends at the end of stderr: closing the pipe under it would break its read
        self.process.stderr.close()

    def output(self):
        """Everything it wrote to stderr: call after kill()."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return "".join(self.log)
            if line is not None:
                self.log.append(line)


class ProcessTestCase(unittest.TestCase):
    """Helpers for tests of proxy.py as a process."""

    def start(self, *args, env=None, open_files=None, cores=None):
        process = ProxyProcess(*args, env=env, open_files=open_files, cores=cores)
        self.addCleanup(process.kill)
        return process

    def post(self, port, text="Hi"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", body=chat_body(text))
        return conn.getresponse()

    def assert_refuses_connections(self, port):
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

    def held_upstream(self):
        """A fake upstream whose streams send "before", then wait for the event returned, then "after"."""
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        hold = threading.Event()
        self.addCleanup(hold.set)
        upstream.script = Script(steps=[chunk(role="assistant", content=""), chunk(content="before"), hold]
                                 + reply("after")[1:])
        return upstream, hold


class ProcessTest(ProcessTestCase):
    def test_open_file_limit_is_raised_for_max_connections_or_a_warning_says_so(self):
        require(os.path.exists("/proc/self/limits"), "Linux's /proc, to read a process's open-file limit")
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        needed = 2 * 2048 + 256  # the default MAX_CONNECTIONS, a client and an upstream socket each
        require(hard == resource.RLIM_INFINITY or hard >= needed, f"a hard open-file limit of {needed}")
        raised = self.start("--demo", open_files=(1024, hard))
        with open(f"/proc/{raised.process.pid}/limits") as limits:
            self.assertRegex(limits.read(), rf"Max open files\s+{needed}\s")
        short = self.start("--demo", open_files=(1024, 1500))
        short.wait_for_line(r"WARNING the open-file limit is 1500, less than the 4352 that MAX_CONNECTIONS 2048 needs")

    def test_quick_start_demo_streams_and_sigint_exits_0(self):
        process = self.start("--demo")
        process.wait_for_line(r"upstream built-in demo upstream")
        response = self.post(process.port, "streaming works word by word")
        self.assertEqual(response.status, 200)
        frames = parse_frames(response.read().decode())
        self.assertEqual("".join(self.contents_of(frames)), "streaming works word by word")
        self.assertGreaterEqual(len(frames), 7)
        self.assertEqual(frames[-1][0], "done")
        self.assertIsNotNone(frames[-1][1]["usage"])
        process.signal(signal.SIGINT)
        self.assertEqual(process.wait(), 0)

    def test_sigterm_stops_accepting_and_drains_running_streams(self):
        upstream, hold = self.held_upstream()
        process = self.start("--base-url", upstream.base_url, env={"OA_API_KEY": TEST_KEY})
        process.wait_for_line(rf"upstream {re.escape(upstream.base_url)}; default model gpt-4o-mini")
        reader = FrameReader(self.post(process.port))
        reader.next_frame()
        self.assertIn("before", reader.next_frame())
        process.signal(signal.SIGTERM)
        process.wait_for_line("stopping")
        self.assert_refuses_connections(process.port)
        self.assertIsNone(process.process.poll())  # still draining the open stream
        hold.set()
        frames = parse_frames(reader.rest())
        self.assertEqual(self.contents_of(frames), ["after", ""])
        self.assertEqual(frames[-1][0], "done")
        self.assertEqual(process.wait(), 0)

    def test_sigterm_with_200_streams_in_the_relay_loop_ends_each_and_exits_0(self):
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        upstream.script = Script(steps=[chunk(role="assistant", content=""), HANG])
        process = self.start("--base-url", upstream.base_url, "--drain-timeout", "0.5",
                             env={"OA_API_KEY": TEST_KEY})
        socks, body = [], chat_body()
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", process.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(b"POST /message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            self.assertIn(b"event:message", read_until_closed_or(sock, b"event:message", 10))
            socks.append(sock)
        process.signal(signal.SIGTERM)
        for sock in socks:  # each ends with its error frame and the end of its body, none is cut
            ending = read_until_closed_or(sock, b"0\r\n\r\n", 10)
            self.assertIn(b"server_shutting_down", ending)
            self.assertTrue(ending.endswith(b"0\r\n\r\n"), ending[-80:])
        self.assertEqual(process.wait(), 0)
        process.wait_for_line(r"drain timeout: ended 200 stream\(s\)")

    def test_drain_timeout_ends_streams_with_an_error_frame(self):
        upstream = FakeUpstream().start()
        self.addCleanup(upstream.close)
        upstream.script = Script(steps=[chunk(role="assistant", content=""), HANG])
        process = self.start("--base-url", upstream.base_url, "--drain-timeout", "0.5",
                             env={"OA_API_KEY": TEST_KEY})
        reader = FrameReader(self.post(process.port))
        reader.next_frame()
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        frames = parse_frames(reader.rest())
        self.assertEqual(frames[-1][0], "error")
        self.assertEqual(frames[-1][1]["error"]["type"], "server_shutting_down")
        self.assertEqual(process.wait(), 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(upstream.disconnected.wait(2))

    def contents_of(self, frames):
        return [data["content"] for event, data in frames if event == "message"]


# --------------------------------------------------------------------------
# Limits shared between copies in a real Redis
# --------------------------------------------------------------------------

REDIS_PASSWORD = "Rp4sW0rdkT9mX2qL7vB3nH"  # no key shape: only masking by value would catch it
REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                                  else None)


class RedisServer:
    """Debian's redis-server on a loopback port and a unix socket, with a password and no persistence."""

    def __init__(self, test):
        require(REDIS_SERVER and shutil.which("redis-cli"), "Debian's redis-server and redis-cli")
        self.folder = tempfile.mkdtemp(prefix="proxy-redis-")
        test.addCleanup(shutil.rmtree, self.folder, True)
        self.port, self.tls_port = free_port(), free_port()
        self.socket_path = os.path.join(self.folder, "redis.sock")
        self.conf = os.path.join(self.folder, "redis.conf")
        self.cert_file = os.path.join(self.folder, "cert.pem")
        key_file = os.path.join(self.folder, "key.pem")
        for path, text in ((self.cert_file, TEST_CERT), (key_file, TEST_CERT_KEY)):
            with open(path, "w") as out:
                out.write(text)
        with open(self.conf, "w") as out:
            out.write(f"port {self.port}\nbind 127.0.0.1\nunixsocket {self.socket_path}\nunixsocketperm 700\n"
                      f"tls-port {self.tls_port}\ntls-cert-file {self.cert_file}\ntls-key-file {key_file}\n"
                      "tls-auth-clients no\n"
                      f"requirepass {REDIS_PASSWORD}\nsave \"\"\nappendonly no\ndir {self.folder}\n"
                      f"logfile \"\"\ndaemonize no\n"
                      f"user proxyuser on >{REDIS_PASSWORD} ~proxy.py:* +@all\n")
        self.process = None
        test.addCleanup(self.stop)
        self.start()

    @property
    def url(self):
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self):
        self.process = subprocess.Popen([REDIS_SERVER, self.conf], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        if not wait_until(lambda: self.cli("PING") == "PONG", 10):
            raise AssertionError("redis-server did not start")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def cli(self, *args, db=0):
        result = subprocess.run(["redis-cli", "-p", str(self.port), "-a", REDIS_PASSWORD, "--no-auth-warning",
                                 "-n", str(db), *args], capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def dump(self, db=0):
        """Every key of the database and its value, as text."""
        lines = []
        for key in self.cli("--scan", db=db).splitlines():
            kind = self.cli("TYPE", key, db=db)
            read = {"string": ["GET"], "hash": ["HGETALL"], "zset": ["ZRANGE", "0", "-1", "WITHSCORES"]}[kind]
            lines.append(f"{key} {kind} {self.cli(*read[:1], key, *read[1:], db=db)}")
        return "\n".join(lines)


def processes_under(pid):
    """The live child processes of pid, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def owner_of(sock, proxy_port, pids):
    """Which of pids holds the proxy's end of the loopback connection sock (from /proc/net/tcp), or None."""
    client_port = sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = (int(address.rpartition(":")[2], 16) for address in fields[1:3])
            if (local, remote) == (proxy_port, client_port):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            if inodes & {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}:
                return pid
    return None


class WorkersTest(ProcessTestCase):
    """WORKERS above 1: a master process and its workers on one port (real processes and sockets)."""

    def setUp(self):
        require(sys.platform.startswith("linux"), "Linux (these tests read /proc)")

    def start_workers(self, *args, env=None, workers=2):
        process = self.start(*args, env={"WORKERS": str(workers), **(env or {})})
        process.wait_for_line(rf"{workers} worker processes \(WORKERS\) on one port")
        self.assertTrue(wait_until(lambda: len(processes_under(process.process.pid)) == workers, 10))
        return process

    def access_lines(self, process, count, pattern=r'"GET /healthz" 200 .* worker=(\d+)'):
        """The worker of each of the next count access lines matching pattern."""
        return [int(process.wait_for_line(pattern).group(1)) for _ in range(count)]

    def streams_on_each_worker(self, process, workers=2):
        """Streams held open by the upstream until every worker runs at least one: {pid: [(conn, reader)]}."""
        pids = processes_under(process.process.pid)
        held = collections.defaultdict(list)
        for _ in range(60):
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("POST", "/message", body=chat_body("Hi"))
            reader = FrameReader(conn.getresponse())
            self.assertIn("before", reader.next_frame() + reader.next_frame())
            held[owner_of(conn.sock, process.port, pids)].append((conn, reader))
            if len([pid for pid in held if pid in pids]) == workers:
                return held
        raise AssertionError(f"the streams went to {dict(held)} only, of workers {pids}")

    def test_two_workers_share_200_new_connections(self):
        process = self.start_workers("--demo")
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        shares = collections.Counter(self.access_lines(process, 200))
        self.assertEqual(set(shares), {1, 2})
        self.assertGreater(min(shares.values()), 40, shares)  # SO_REUSEPORT hashes each connection: ~100 each
        sockets = [{name for name in (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
                    if name.startswith("socket:")} for pid in processes_under(process.process.pid)]
        self.assertEqual(sockets[0] & sockets[1], set())  # each listens on a socket of its own

    def test_without_so_reuseport_the_workers_share_one_listening_socket(self):
        # As on macOS and the BSDs: proxy.py as a process, told that this system does not spread connections.
        script = ("import sys; sys.path.insert(0, sys.argv[1]); import proxy; "
                  "proxy.spreads_connections = lambda: False; sys.exit(proxy.main(sys.argv[2:]))")
        process = subprocess.Popen([sys.executable, "-c", script, HERE, "--demo", "--port", "0"],
                                   env={**os.environ, "WORKERS": "2"}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(self.kill_group, process)
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", process.stderr.readline()).group(1))
        self.assertIn("2 worker processes (WORKERS) on one port, sharing one listening socket",
                      process.stderr.readline())
        self.assertTrue(wait_until(lambda: len(processes_under(process.pid)) == 2, 10))
        listening = {pid: {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                     for pid in processes_under(process.pid)}
        for _ in range(50):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        shared = set.intersection(*listening.values())  # the one listening socket, in both workers
        self.assertEqual(len([name for name in shared if name.startswith("socket:")]), 1, listening)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(15), 0)

    def test_startup_lines_are_written_once_with_the_worker_count_and_the_totals(self):
        process = self.start_workers("--demo", env={"MAX_STREAMS": "300", "MAX_CONNECTIONS": "500"})
        process.signal(signal.SIGTERM)
        self.assertEqual(process.wait(), 0)
        process.kill()
        output = process.output()
        self.assertEqual(output.count("listening on"), 1)
        self.assertEqual(output.count("upstream built-in demo upstream"), 1)
        self.assertIn("2 worker processes (WORKERS) on one port, each on its own socket, the kernel spreading new "
                      "connections (SO_REUSEPORT); MAX_STREAMS 300 and MAX_CONNECTIONS 500 are each worker's "
                      "(600 and 1000 in all)", output)

    def test_a_worker_killed_is_replaced_its_streams_end_and_the_others_finish(self):
        upstream, hold = self.held_upstream()
        process = self.start_workers("--base-url", upstream.base_url, env={"OA_API_KEY": TEST_KEY})
        held = self.streams_on_each_worker(process)
        victim, survivor = sorted(held, key=lambda pid: pid != min(held))
        os.kill(victim, signal.SIGKILL)
        for conn, reader in held[victim]:  # ended by the kernel at once: never hanging
            conn.sock.settimeout(5)
            with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
                self.assertNotIn("after", reader.rest())
        process.wait_for_line(rf"WARNING worker \d \(pid {victim}\) was killed by signal 9 \(SIGKILL\) after "
                              r"[\d.]+ s; a new one starts in 0.5 s")
        self.assertTrue(wait_until(lambda: len(set(processes_under(process.process.pid)) - {survivor}) == 1, 10))
        replacement = (set(processes_under(process.process.pid)) - {survivor}).pop()
        hold.set()
        for conn, reader in held[survivor]:  # untouched
            frames = parse_frames(reader.rest())
            self.assertEqual([data["content"] for event, data in frames if event == "message"], ["after", ""])
            self.assertEqual(frames[-1][0], "done")
        served_by = set()
        for _ in range(100):  # the replacement serves: new connections reach it
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            response.read()
            served_by.add(owner_of(conn.sock, process.port, [replacement, survivor]))
            if replacement in served_by:
                break
        self.assertIn(replacement, served_by)

    def test_sigterm_drains_streams_in_every_worker_and_exits_0(self):
        upstream, hold = self.held_upstream()
        process = self.start_workers("--base-url", upstream.base_url, env={"OA_API_KEY": TEST_KEY})
        held = self.streams_on_each_worker(process)
        process.signal(signal.SIGTERM)
        process.wait_for_line("stopping")
        process.wait_for_line("stopping")
        self.assert_refuses_connections(process.port)
        self.assertIsNone(process.process.poll())  # still draining the open streams
        hold.set()
        for streams in held.values():
            for conn, reader in streams:
                frames = parse_frames(reader.rest())
                self.assertEqual(frames[-1][0], "done")
                self.assertIn("after", [data["content"] for event, data in frames if event == "message"])
        self.assertEqual(process.wait(), 0)
        process.wait_for_line("stopped: every worker has stopped")

    def test_workers_whose_master_is_killed_drain_and_stop(self):
        process = self.start_workers("--demo")
        workers = processes_under(process.process.pid)
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", body=chat_body("one two three four five six seven eight nine ten"))
        reader = FrameReader(conn.getresponse())
        reader.next_frame()
        process.process.kill()  # the master alone
        frames = parse_frames(reader.rest())  # the stream on its worker still ends whole
        self.assertEqual(frames[-1][0], "done")

        def gone(pid):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().rpartition(")")[2].split()[0] == "Z"
            except OSError:
                return True
        self.assertTrue(wait_until(lambda: all(gone(pid) for pid in workers), 10), workers)

    def test_a_master_that_stops_answering_is_waited_for_at_most_its_timeout_once(self):
        process = self.start_workers("--demo", env={"RATE_LIMIT_RPM": "1000"})
        self.assertEqual(self.post(process.port).status, 200)
        process.signal(signal.SIGSTOP)  # the master: its workers' questions go unanswered
        self.addCleanup(lambda: process.process.poll() is None and process.signal(signal.SIGCONT))
        took = []
        for _ in range(12):  # until six in a row are quick: each worker has waited once
            started = time.monotonic()
            response = self.post(process.port)
            self.assertEqual(response.status, 200)  # decided by the worker alone, fail-open
            response.read()
            took.append(time.monotonic() - started)
            if len(took) >= 6 and max(took[-6:]) < 1:
                break
        slow = [seconds for seconds in took if seconds >= 1]
        self.assertLessEqual(len(slow), 2, took)  # once per worker at most
        self.assertLess(max(took), proxy.MASTER_TIMEOUT + 1.5, took)
        process.signal(signal.SIGCONT)
        process.wait_for_line(r"WARNING the master process did not answer a question \(no answer within 2 s\): "
                              r"from now on this worker decides alone")

    def test_ctrl_c_in_a_terminal_reaches_every_process_and_drains_once(self):
        process = self.start_workers("--demo")
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", body=chat_body("one two three four five six seven eight nine ten"))
        reader = FrameReader(conn.getresponse())
        reader.next_frame()
        process.signal_group(signal.SIGINT)  # what a terminal sends: to the master and its workers at once
        frames = parse_frames(reader.rest())
        self.assertEqual(frames[-1][0], "done")  # drained, not cut short as a second signal would
        self.assertEqual(len([data for event, data in frames if event == "message" and data["content"]]), 10)
        self.assertEqual(process.wait(), 0)

    def assert_rpm_counted_once(self, env):
        process = self.start_workers("--demo", env={"RATE_LIMIT_RPM": "10", **env})
        statuses = []
        for _ in range(25):
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            conn.request("POST", "/message", body=chat_body("Hi"))
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            conn.close()
        self.assertEqual(collections.Counter(statuses), {200: 10, 429: 15})
        workers = self.access_lines(process, 25, r'"POST /message" (?:200|429) .* worker=(\d+)')
        self.assertEqual(set(workers), {1, 2})  # both took a share, and still 10 in all

    def test_a_client_limit_is_counted_once_across_workers_without_redis(self):
        self.assert_rpm_counted_once({})

    def test_a_client_limit_is_counted_once_across_workers_with_redis(self):
        redis = RedisServer(self)
        self.assert_rpm_counted_once({"REDIS_URL": redis.url})
        self.assertIn("requests", redis.cli("--scan"))

    def test_running_streams_per_client_are_counted_once_and_freed_when_a_worker_dies(self):
        upstream, hold = self.held_upstream()
        process = self.start_workers("--base-url", upstream.base_url,
                                     env={"OA_API_KEY": TEST_KEY, "MAX_STREAMS_PER_CLIENT": "2"})
        pids = processes_under(process.process.pid)
        held = []
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("POST", "/message", body=chat_body("Hi"))
            reader = FrameReader(conn.getresponse())
            reader.next_frame()
            held.append(owner_of(conn.sock, process.port, pids))
        for _ in range(6):  # whichever worker a third lands on, the client has its two
            self.assertEqual(self.post(process.port).status, 429)
        os.kill(held[0], signal.SIGKILL)  # the master frees the slot the dead worker's stream held
        process.wait_for_line("was killed by signal 9")
        self.assertTrue(wait_until(lambda: len(processes_under(process.process.pid)) == 2, 10))
        hold.set()
        self.assertEqual(self.post(process.port).status, 200)

    def test_metrics_answer_for_the_whole_server_whichever_worker_is_scraped(self):
        process = self.start_workers("--demo")
        for _ in range(30):
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            conn.request("POST", "/message", body=chat_body("Hi"))
            conn.getresponse().read()
            conn.close()
        self.assertEqual(set(self.access_lines(process, 30, r'"POST /message" 200 .* worker=(\d+)')), {1, 2})

        def scrape():
            conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return {name: float(value) for name, value in re.findall(
                r'^(proxy_requests_total\{route="/message",status="200"\}|'
                r'proxy_request_duration_seconds_count\{route="/message"\}|'
                r'proxy_tokens_total\{model="gpt-4o-mini",client="127.0.0.1",kind="completion"\}|'
                r'proxy_upstream_keys\{upstream="primary",state="ready",worker="\d"\}) (\S+)$', text, re.M)}

        self.assertTrue(wait_until(lambda: scrape().get(
            'proxy_requests_total{route="/message",status="200"}') == 30, 5))  # the others' are a second old
        scrapes = [scrape() for _ in range(20)]
        self.assertEqual(set(self.access_lines(process, 20, r'"GET /metrics" 200 .* worker=(\d+)')), {1, 2})
        for figures in scrapes:
            self.assertEqual(figures, scrapes[0])
        self.assertEqual(scrapes[0]['proxy_requests_total{route="/message",status="200"}'], 30)
        self.assertEqual(scrapes[0]['proxy_request_duration_seconds_count{route="/message"}'], 30)
        self.assertEqual(scrapes[0]['proxy_tokens_total{model="gpt-4o-mini",client="127.0.0.1",kind="completion"}'],
                         30)
        self.assertEqual(len([name for name in scrapes[0] if "worker=" in name]), 2)  # a gauge per worker

    def test_log_lines_of_workers_are_never_interleaved_nor_held_up_by_a_stalled_stderr(self):
        # stderr is a pipe nobody reads while requests are served: it fills, and each worker's batches
        # of lines (larger than the 4 KiB a pipe takes in one piece) would be cut between writers; past
        # 256 KiB (with the pipe's 64 KiB, 500 JSON lines) the master stops reading its workers' lines.
        # Its answers (the client limits) never wait.
        line_patterns = {"json": (r'\{"time": .*\}', 800),
                         "text": (r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ .*', 600)}
        for log_format, (whole_line, count) in line_patterns.items():
            with self.subTest(log_format=log_format):
                port = free_port()
                process = subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "proxy.py"), "--demo", "--port", str(port)],
                    env={**os.environ, "WORKERS": "2", "LOG_FORMAT": log_format, "RATE_LIMIT_RPM": "1000000"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, start_new_session=True)
                self.addCleanup(process.stderr.close)
                self.addCleanup(self.kill_group, process)  # each subtest's own process, if a failure left it
                self.assertTrue(wait_until(lambda: self.answers(port), 10))
                paths = [f"/{'x' * 150}{n}" for n in range(count)]
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    self.assertEqual(set(pool.map(lambda path: self.fetch(port, path), paths)), {404})
                    started = time.monotonic()
                    self.assertEqual(set(pool.map(lambda n: self.fetch(port, "/message", chat_body()), range(200))),
                                     {200})
                    self.assertLess(time.monotonic() - started, 10)  # a master stuck on stderr: 2 s a request
                process.send_signal(signal.SIGTERM)
                _, output = process.communicate(timeout=60)
                self.assertEqual(process.returncode, 0)
                lines = output.decode().splitlines()
                self.assertEqual([line for line in lines if not re.fullmatch(whole_line, line)], [])
                logged = re.findall(r'(/x{150}\d+).*worker.*?(\d)', output.decode())
                self.assertEqual(sorted(path for path, _ in logged), sorted(paths))
                self.assertEqual({worker for _, worker in logged}, {"1", "2"})

    @staticmethod
    def kill_group(process):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    @staticmethod
    def fetch(port, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET" if body is None else "POST", path, body=body)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def answers(self, port):
        with contextlib.suppress(OSError):
            return self.fetch(port, "/healthz") == 200
        return False

    def test_auto_stays_within_a_containers_cpu_limit(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "cpu.max")
        for text, cores in (("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1),
                            ("400000 100000\n", 4), ("", None)):
            with open(path, "w") as limit:
                limit.write(text)
            self.assertEqual(proxy.cgroup_cpu_limit(path), cores, text)
        self.assertIsNone(proxy.cgroup_cpu_limit(os.path.join(folder, "missing")))

    def test_workers_auto_uses_the_cores_this_process_may_run_on(self):
        require(hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2, "two cores")
        two = self.start("--demo", env={"WORKERS": "auto"}, cores={0, 1})
        two.wait_for_line(r"2 worker processes \(WORKERS\) on one port")
        one = self.start("--demo", env={"WORKERS": "auto"}, cores={0})  # one core: one process, as without it
        one.wait_for_line(r"upstream built-in demo upstream")
        self.assertEqual(processes_under(one.process.pid), [])
        self.assertEqual(self.post(one.port).status, 200)
        one.signal(signal.SIGINT)
        self.assertEqual(one.wait(), 0)
        one.kill()
        self.assertNotIn("worker", one.output())


class SlowLink:
    """A TCP relay to a loopback port that holds every piece `delay` seconds each way: a Redis that far away."""

    def __init__(self, test, target_port, delay):
        self.target_port, self.delay = target_port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = [self.listener]
        test.addCleanup(self.close)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:  # until close() shuts the listener
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                return
            server.settimeout(None)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(source, sink, self.delay), daemon=True).start()

    @staticmethod
    def pump(source, sink, delay):
        """Bytes from source to sink, each piece `delay` late, until either side closes."""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                time.sleep(delay)  # the network's delay, not synchronisation
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def get(port, path, key=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=bearer(key) if key else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def seconds_to_utc_midnight():
    return 86400 - time.time() % 86400


class SharedLimitsTest(unittest.TestCase):
    """Two proxy processes sharing one Redis: one client's limits hold as one across both."""

    def setUp(self):
        self.redis = RedisServer(self)
        self.upstream = FakeUpstream().start()
        self.addCleanup(self.upstream.close)
        self.upstream.script = lambda received: (json_script({"data": []}) if received.method == "GET"
                                                 else Script(steps=reply("ok")))

    def copy(self, redis_url=None, base_url=None, **settings):
        env = {"OA_API_KEY": TEST_KEY, "REDIS_URL": redis_url or self.redis.url,
               "PROXY_API_KEYS": f"alice={ALICE_KEY},bob={BOB_KEY}",
               "REDIS_TIMEOUT": "2",  # a loaded CI machine may take longer than 0.5 s to connect first
               **{name: str(value) for name, value in settings.items()}}
        process = ProxyProcess("--base-url", base_url or self.upstream.base_url, env=env)
        self.addCleanup(process.kill)
        return process

    def message(self, port, key):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/message", body=chat_body(), headers=bearer(key))
        return conn.getresponse()

    def test_a_realtime_session_holds_its_stream_slot_and_counts_its_tokens_across_copies(self):
        realtime = FakeRealtime()
        self.addCleanup(realtime.close)
        a = self.copy(base_url=realtime.base_url, MAX_STREAMS_PER_CLIENT=1, TOKEN_BUDGET_DAY=10)
        b = self.copy(base_url=realtime.base_url, MAX_STREAMS_PER_CLIENT=1, TOKEN_BUDGET_DAY=10)
        status_line, _, peer = open_websocket(self, a.port, headers=bearer(ALICE_KEY))
        self.assertIn(" 101 ", status_line)
        peer.recv_json()
        status_line, head, refused = open_websocket(self, b.port, headers=bearer(ALICE_KEY))
        self.assertIn(" 429 ", status_line)  # alice's one slot is taken, on the other copy
        peer.send_json({"text": "one"})
        peer.recv_json()
        self.assertEqual(peer.recv_json()["type"], "response.done")  # 7 of alice's 10 tokens, counted in Redis
        peer.send(0x8, struct.pack("!H", 1000))
        self.assertTrue(peer.ended_within(3))
        self.assertTrue(wait_until(lambda: self.redis.cli("ZCARD", "proxy.py:{alice}:streams").strip() == "0"))
        status_line, _, peer = open_websocket(self, b.port, headers=bearer(ALICE_KEY))
        self.assertIn(" 101 ", status_line)  # the slot is free again, on either copy
        peer.recv_json()
        peer.send_json({"text": "two"})
        peer.recv_json()
        peer.recv_json()
        code, reason = peer.recv_close()  # 14 of 10: the session on b ends, the day's budget spent across copies
        self.assertEqual(code, 1008)
        self.assertIn("TOKEN_BUDGET_DAY", reason)

    def test_requests_per_minute_hold_across_copies(self):
        a, b = self.copy(RATE_LIMIT_RPM=4), self.copy(RATE_LIMIT_RPM=4)
        a.wait_for_line(r"limits and budgets live in Redis at redis://127\.0\.0\.1:\d+/0, shared")
        for port in (a.port, b.port, a.port, b.port):
            self.assertEqual(get(port, "/v1/models", ALICE_KEY)[0], 200)
        for port in (a.port, b.port):  # the fifth in a minute, on either copy
            status, headers, body = get(port, "/v1/models", ALICE_KEY)
            self.assertEqual(status, 429, body)
            self.assertIn("4 requests per minute (RATE_LIMIT_RPM)", json.loads(body)["error"]["message"])
            self.assertTrue(1 <= int(headers["Retry-After"]) <= 15, headers["Retry-After"])
        self.assertEqual(get(b.port, "/v1/models", BOB_KEY)[0], 200)  # another client is not touched
        self.assertEqual(len(self.upstream.requests), 5)

    def test_tokens_per_minute_hold_across_copies_in_one_bucket_a_second(self):
        a, b = self.copy(RATE_LIMIT_TPM=100), self.copy(RATE_LIMIT_TPM=100)
        started = time.monotonic()
        for index in range(20):  # 5 tokens each, by turns on each copy: 100 in all
            port = (a.port, b.port)[index % 2]
            self.assertEqual(parse_frames(self.message(port, ALICE_KEY).read().decode())[-1][0], "done")
        elapsed = time.monotonic() - started
        for port in (a.port, b.port):
            status, headers, body = get(port, "/v1/models", ALICE_KEY)
            self.assertEqual(status, 429, body)
            self.assertIn("100 tokens per minute (RATE_LIMIT_TPM)", json.loads(body)["error"]["message"])
            self.assertTrue(55 <= int(headers["Retry-After"]) <= 60, headers["Retry-After"])
        self.assertEqual(get(b.port, "/v1/models", BOB_KEY)[0], 200)
        buckets = self.redis.cli("HGETALL", "proxy.py:{alice}:tokens").split()
        self.assertEqual(sum(int(tokens) for tokens in buckets[1::2]), 100)
        # what a request's admission reads grows with the seconds, not with the requests
        self.assertLessEqual(len(buckets) // 2, math.ceil(elapsed) + 1, buckets)

    def test_a_stream_slot_holds_across_copies_and_frees_itself_when_its_copy_is_killed(self):
        a = self.copy(MAX_STREAMS_PER_CLIENT=1, STREAM_LEASE=1.5, REDIS_TIMEOUT=0.5)
        b = self.copy(MAX_STREAMS_PER_CLIENT=1)
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = Script(steps=[chunk(role="assistant", content=""), hold] + reply("x")[1:])
        FrameReader(self.message(a.port, ALICE_KEY)).next_frame()
        status, _, body = get(b.port, "/v1/models", ALICE_KEY)
        self.assertEqual(status, 429, body)
        self.assertIn("MAX_STREAMS_PER_CLIENT", body.decode())
        time.sleep(2.5)  # longer than the lease: only its renewal by copy A keeps the slot taken
        self.assertEqual(get(b.port, "/v1/models", ALICE_KEY)[0], 429)
        self.upstream.script = lambda received: json_script({"data": []})
        a.process.kill()  # SIGKILL: nothing is released on the way out
        killed = time.monotonic()
        self.assertEqual(get(b.port, "/v1/models", ALICE_KEY)[0], 429)
        self.assertTrue(wait_until(lambda: get(b.port, "/v1/models", ALICE_KEY)[0] == 200, 5),
                        "the killed copy's slot did not free itself")
        self.assertLess(time.monotonic() - killed, 1.5 + 1.0)  # within the lease, and a renewal's lag

    def test_a_token_budget_spent_on_both_copies_is_refused_on_both(self):
        a, b = self.copy(TOKEN_BUDGET_DAY=10), self.copy(TOKEN_BUDGET_DAY=10)
        for port in (a.port, b.port):  # 5 tokens each (usage 3 + 2)
            self.assertEqual(parse_frames(self.message(port, ALICE_KEY).read().decode())[-1][0], "done")
        for port in (a.port, b.port):
            response = self.message(port, ALICE_KEY)
            body = json.loads(response.read())
            self.assertEqual(response.status, 429)
            self.assertEqual(body["error"]["type"], "insufficient_quota")
            self.assertEqual(body["error"]["code"], "insufficient_quota")
            self.assertIn("10 a day (TOKEN_BUDGET_DAY)", body["error"]["message"])
            self.assertLessEqual(abs(int(response.getheader("Retry-After")) - seconds_to_utc_midnight()), 5)
        self.assertEqual(self.message(b.port, BOB_KEY).status, 200)
        if openai is not None or IN_CI:
            require(openai is not None, "the openai package")
            client = openai.OpenAI(api_key=ALICE_KEY, base_url=f"http://127.0.0.1:{a.port}/v1", max_retries=0)
            with self.assertRaises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
            self.assertEqual(caught.exception.code, "insufficient_quota")
        metrics = get(a.port, "/metrics")[2].decode()
        self.assertRegex(metrics, r'proxy_budget_rejections_total\{period="day"\} [1-9]')
        self.assertRegex(metrics, r"proxy_redis_round_trips_total [1-9]")
        self.assertIn("proxy_redis_errors_total 0", metrics)
        self.assertEqual(len(self.upstream.requests), 3)

    def test_a_request_is_settled_in_redis_before_its_client_sees_its_end(self):
        # Redis 0.1 s away each way: a slot given back or tokens counted after the end would still be
        # missing when the client, having read the whole response, looks.
        link = SlowLink(self, self.redis.port, 0.1)
        a = self.copy(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{link.port}/0", MAX_STREAMS_PER_CLIENT=1,
                      TOKEN_BUDGET_DAY=1000, REDIS_TIMEOUT=2, STREAM_LEASE=6)
        streams = "proxy.py:{alice}:streams"
        day = "proxy.py:{alice}:day:" + time.strftime("%Y-%m-%d", time.gmtime())
        hold = threading.Event()
        self.addCleanup(hold.set)
        self.upstream.script = in_turn(
            Script(steps=[chunk(role="assistant", content=""), hold] + reply("ok")[1:]),
            Script(steps=reply("ok")),
            json_script({"object": "chat.completion", "choices": [],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
            json_script({"error": {"message": "bad", "type": "invalid_request_error"}}, status=400))
        reader = FrameReader(self.message(a.port, ALICE_KEY))
        reader.next_frame()
        self.assertEqual(self.redis.cli("ZCARD", streams), "1")  # the slot is held in Redis while it runs
        hold.set()
        self.assertEqual(parse_frames(reader.rest())[-1][0], "done")
        looks = [("/message, chunked", 200, self.redis.cli("ZCARD", streams), self.redis.cli("GET", day))]
        for shape, body in (("stream, chunked", chat_body(model="gpt-4o-mini", stream=True)),
                            ("JSON, Content-Length", chat_body(model="gpt-4o-mini")),
                            ("error, Content-Length", chat_body(model="gpt-4o-mini"))):
            conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={**bearer(ALICE_KEY), "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            looks.append((shape, response.status, self.redis.cli("ZCARD", streams), self.redis.cli("GET", day)))
        self.assertEqual(looks, [("/message, chunked", 200, "0", "5"), ("stream, chunked", 200, "0", "10"),
                                 ("JSON, Content-Length", 200, "0", "17"),
                                 ("error, Content-Length", 400, "0", "17")])

    def test_redis_out_fail_open_serves_fail_closed_refuses_and_both_share_again_when_it_returns(self):
        opened = self.copy(RATE_LIMIT_RPM=2)
        closed = self.copy(RATE_LIMIT_RPM=2, REDIS_FAILURE_MODE="closed")
        self.redis.stop()
        for _ in range(2):
            self.assertEqual(get(opened.port, "/v1/models", ALICE_KEY)[0], 200)
        opened.wait_for_line(r"WARNING Redis at redis://127\.0\.0\.1:\d+/0 is unreachable \(.*\): each copy "
                             r"enforces its own limits until it answers again \(REDIS_FAILURE_MODE=open\)")
        self.assertEqual(get(opened.port, "/v1/models", ALICE_KEY)[0], 429)  # this copy's own count, meanwhile
        status, headers, body = get(closed.port, "/v1/models", ALICE_KEY)
        self.assertEqual(status, 503, body)
        self.assertEqual(json.loads(body)["error"]["type"], "limits_unavailable")
        self.assertEqual(headers["Retry-After"], "2")
        status, _, body = get(opened.port, "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["status"], "degraded")
        self.assertIn("Redis unreachable", json.loads(body)["limits"])
        metrics = get(opened.port, "/metrics")[2].decode()
        self.assertIn("proxy_redis_up 0", metrics)
        self.assertRegex(metrics, r'proxy_limits_unshared_total\{outcome="served"\} 3')
        self.assertRegex(metrics, r"proxy_redis_errors_total [1-9]")
        self.assertRegex(get(closed.port, "/metrics")[2].decode(), r'proxy_limits_unshared_total\{outcome="refused"\} 1')

        self.redis.start()
        for process in (opened, closed):
            process.wait_for_line(r"INFO Redis at .* answers again after \d+ s: limits are shared again")
            self.assertEqual(json.loads(get(process.port, "/healthz")[2])["status"], "ok")
        for port in (opened.port, closed.port):
            self.assertEqual(get(port, "/v1/models", BOB_KEY)[0], 200)
        for port in (opened.port, closed.port):
            self.assertEqual(get(port, "/v1/models", BOB_KEY)[0], 429)
        opened.kill()
        self.assertEqual(opened.output().count("is unreachable"), 1, "one warning per outage")

    def test_connections_redis_closed_meanwhile_are_replaced_without_an_outage(self):
        copy = self.copy(RATE_LIMIT_RPM=3)
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertRegex(self.redis.cli("CLIENT", "KILL", "TYPE", "normal"), r"^[1-9]")  # as its idle timeout does
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 429)  # still counted in Redis
        metrics = get(copy.port, "/metrics")[2].decode()
        self.assertIn("proxy_redis_up 1", metrics)
        self.assertRegex(metrics, r'proxy_limits_unshared_total\{outcome="served"\} 0')

    def test_a_slow_redis_holds_no_request_longer_than_its_timeout(self):
        copy = self.copy(RATE_LIMIT_RPM=100, REDIS_TIMEOUT=1)
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)
        self.redis.process.send_signal(signal.SIGSTOP)  # connected, but silent
        self.addCleanup(self.redis.process.send_signal, signal.SIGCONT)
        started = time.monotonic()
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertLess(time.monotonic() - started, 1 + 1)  # REDIS_TIMEOUT, and the request's own time
        started = time.monotonic()
        self.assertEqual(get(copy.port, "/v1/models", ALICE_KEY)[0], 200)  # Redis known out: not asked again
        self.assertLess(time.monotonic() - started, 0.5)
        self.redis.process.send_signal(signal.SIGCONT)
        copy.wait_for_line(r"answers again")

    def test_a_unix_socket_a_user_and_a_database(self):
        url = f"unix://proxyuser:{REDIS_PASSWORD}@{self.redis.socket_path}?db=3"
        a, b = self.copy(url, RATE_LIMIT_RPM=1), self.copy(url, RATE_LIMIT_RPM=1)
        a.wait_for_line(rf"live in Redis at unix://proxyuser@{re.escape(self.redis.socket_path)}\?db=3, shared")
        self.assertEqual(get(a.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertEqual(get(b.port, "/v1/models", ALICE_KEY)[0], 429)
        self.assertIn("proxy.py:{alice}:requests", self.redis.cli("--scan", db=3).splitlines())
        self.assertEqual(self.redis.cli("--scan", db=0), "")

    def test_two_copies_behind_nginx_enforce_one_clients_limits_as_one(self):
        config = make_config(base_url=self.upstream.base_url, proxy_api_keys=(("alice", ALICE_KEY),),
                             rate_limit_rpm=3, redis_url=self.redis.url, redis_timeout=2.0)
        copies = []
        for _ in range(2):
            server = proxy.ProxyServer(config)
            threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
            self.addCleanup(server.close)
            self.addCleanup(server.shutdown)
            copies.append(server)
        nginx_port = start_nginx(self, [server.server_port for server in copies])
        statuses = [get(nginx_port, "/v1/models", ALICE_KEY)[0] for _ in range(5)]
        self.assertEqual(statuses, [200, 200, 200, 429, 429])
        def counts(server):  # recorded once the response is out: maybe a moment after the client read it
            return {status: int(count) for status, count in re.findall(
                r'proxy_requests_total\{route="/v1/models",status="(\d+)"\} (\d+)', server.metrics.render({}))}

        self.assertTrue(wait_until(lambda: sum(sum(counts(server).values()) for server in copies) == 5))
        for server in copies:  # each copy refused a request with fewer than 3 of its own served
            seen = counts(server)
            self.assertLess(seen.get("200", 0), 3, seen)
            self.assertGreaterEqual(seen.get("429", 0), 1, seen)

    def test_rediss_verifies_the_certificate(self):
        url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{self.redis.tls_port}/0"
        tls = self.copy(url, RATE_LIMIT_RPM=1, SSL_CERT_FILE=self.redis.cert_file)
        plain = self.copy(RATE_LIMIT_RPM=1)
        self.assertEqual(get(tls.port, "/v1/models", ALICE_KEY)[0], 200)
        self.assertEqual(get(plain.port, "/v1/models", ALICE_KEY)[0], 429)  # one Redis, over TLS or not
        untrusting = self.copy(url, RATE_LIMIT_RPM=1, SSL_CERT_FILE=os.devnull)
        untrusting.wait_for_line(r"WARNING Redis at rediss://127\.0\.0\.1:\d+/0 is unreachable \(.*CERTIFICATE_VERIFY_FAILED")
        self.assertEqual(get(untrusting.port, "/v1/models", ALICE_KEY)[0], 200)  # fail-open: this copy's own count

    def test_nothing_secret_in_redis_or_in_any_output(self):
        settings = {"RATE_LIMIT_RPM": 50, "RATE_LIMIT_TPM": 1000, "MAX_STREAMS_PER_CLIENT": 2,
                    "TOKEN_BUDGET_DAY": 1000, "TOKEN_BUDGET_MONTH": 5000, "METRICS_TOKEN": ECHO_METRICS_TOKEN}
        a, b = self.copy(**settings), self.copy(**settings)
        env = {"OA_API_KEY": TEST_KEY, "REDIS_URL": self.redis.url, "RATE_LIMIT_RPM": "50"}
        by_address = ProxyProcess("--base-url", self.upstream.base_url, env=env)  # no client keys: by address
        self.addCleanup(by_address.kill)
        for port, key in ((a.port, ALICE_KEY), (b.port, BOB_KEY), (a.port, BOB_KEY)):
            self.assertEqual(parse_frames(self.message(port, key).read().decode())[-1][0], "done")
        self.assertEqual(get(by_address.port, "/v1/models")[0], 200)
        answers = [get(port, path, key)[2].decode() for port in (a.port, b.port)
                   for path, key in (("/healthz", None), ("/metrics", ECHO_METRICS_TOKEN), ("/v1/nope", "wrong"))]
        stored = self.redis.dump()
        self.redis.stop()  # an outage, logged
        answers.append(get(a.port, "/v1/models", ALICE_KEY)[2].decode())
        a.wait_for_line("is unreachable")
        for process in (a, b, by_address):
            process.kill()
        everything = "\n".join([stored, *answers, a.output(), b.output(), by_address.output()])
        for secret in (ALICE_KEY, BOB_KEY, REDIS_PASSWORD, ECHO_METRICS_TOKEN):
            self.assertNotIn(secret[:8], everything)
        self.assertIn("proxy.py:{alice}:", stored)
        self.assertIn("proxy.py:{ip-" + hashlib.sha256(b"127.0.0.1").hexdigest()[:16] + "}:requests", stored)
        self.assertNotIn("127.0.0.1", stored)


if __name__ == "__main__":
    unittest.main()
