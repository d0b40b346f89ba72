"""A local HTTP server that speaks the Slack Web API's wire format for chat.postMessage and an
incoming webhook, so tests can point slack-sdk at it and assert on what it received."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

VALID_TOKEN = "xoxb-test-0000-secret"


class SlackTestServer:
    def __init__(self, rate_limit_first: int = 0, retry_after: int = 1, fail_5xx_first: int = 0,
                 missing_channels: frozenset[str] = frozenset()):
        self.missing_channels = missing_channels  # answered channel_not_found, as Slack does
        self.rate_limit_first = rate_limit_first  # answer this many requests with 429 first
        self.retry_after = retry_after
        self.fail_5xx_first = fail_5xx_first  # then this many with 503
        self.requests: list[dict] = []  # every request: time, path, status answered
        self.messages: list[dict] = []  # accepted chat.postMessage / webhook payloads
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if "json" in (self.headers.get("Content-Type") or ""):
                    body = json.loads(raw or b"{}")
                else:
                    body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                status, headers, payload = server.answer(self.path, self.headers, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_header("Content-Type", "text/plain" if isinstance(payload, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:  # what slack-sdk's WebClient(base_url=...) takes
        return f"http://127.0.0.1:{self.httpd.server_port}/api/"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/services/T000/B000/XXXX"

    def answer(self, path: str, headers, body: dict):
        with self.lock:
            entry = {"time": time.monotonic(), "path": path, "body": body}
            self.requests.append(entry)
            if self.rate_limit_first > 0:
                self.rate_limit_first -= 1
                entry["status"] = 429
                return 429, {"Retry-After": str(self.retry_after)}, {"ok": False, "error": "ratelimited"}
            if self.fail_5xx_first > 0:
                self.fail_5xx_first -= 1
                entry["status"] = 503
                return 503, {}, {"ok": False, "error": "service_unavailable"}
            entry["status"] = 200
            if path.startswith("/services/"):  # incoming webhook: plain "ok"
                self.messages.append(body)
                return 200, {}, b"ok"
            if path != "/api/chat.postMessage":
                return 200, {}, {"ok": False, "error": "unknown_method"}
            if headers.get("Authorization") != f"Bearer {VALID_TOKEN}":
                return 200, {}, {"ok": False, "error": "invalid_auth"}
            if not body.get("channel") or body["channel"] in self.missing_channels:
                return 200, {}, {"ok": False, "error": "channel_not_found"}
            self.messages.append(body)
            ts = f"{time.time():.6f}"
            return 200, {}, {"ok": True, "channel": "C0TEST", "ts": ts,
                             "message": {"type": "message", "text": body.get("text", ""), "ts": ts}}

    def __enter__(self) -> "SlackTestServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
