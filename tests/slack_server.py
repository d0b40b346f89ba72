"""A local HTTP server that speaks the Slack Web API's wire format for chat.postMessage, an
incoming webhook and files_upload_v2's three steps (files.getUploadURLExternal, the upload to the
URL it gave, files.completeUploadExternal), so tests can point slack-sdk at it and assert on what
it received."""

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
        self.message_ts: list[str] = []  # the ts answered for each accepted chat.postMessage
        self.uploads: dict[str, dict] = {}  # file id -> {"filename", "length", "data", then "channel_id", ...}
        self.files: list[dict] = []  # completed uploads (files.completeUploadExternal), in order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.startswith("/upload/"):  # files_upload_v2's step 2: the file's bytes
                    ok = server.receive_upload(self.path[len("/upload/"):], raw)
                    self.send_response(200 if ok else 404)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                    return
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
            if path not in ("/api/chat.postMessage", "/api/files.getUploadURLExternal",
                            "/api/files.completeUploadExternal"):
                return 200, {}, {"ok": False, "error": "unknown_method"}
            if headers.get("Authorization") != f"Bearer {VALID_TOKEN}":
                return 200, {}, {"ok": False, "error": "invalid_auth"}
            if path == "/api/files.getUploadURLExternal":
                if not body.get("filename") or not str(body.get("length", "")).isdigit():
                    return 200, {}, {"ok": False, "error": "invalid_arguments"}
                file_id = f"F{len(self.uploads) + 1:06d}"
                self.uploads[file_id] = {"filename": body["filename"], "length": int(body["length"]), "data": None}
                return 200, {}, {"ok": True, "file_id": file_id,
                                 "upload_url": f"http://127.0.0.1:{self.httpd.server_port}/upload/{file_id}"}
            if path == "/api/files.completeUploadExternal":
                files = json.loads(body.get("files") or "[]") if isinstance(body.get("files"), str) else body["files"]
                if not files or any(self.uploads.get(f.get("id"), {}).get("data") is None for f in files):
                    return 200, {}, {"ok": False, "error": "file_not_found"}  # never uploaded
                if body.get("channel_id") and body["channel_id"] != "C0TEST":
                    return 200, {}, {"ok": False, "error": "channel_not_found"}  # a name, not an id
                done = []
                for f in files:
                    upload = self.uploads[f["id"]] | {"title": f.get("title"), "channel_id": body.get("channel_id"),
                                                      "thread_ts": body.get("thread_ts")}
                    self.files.append(upload)
                    done.append({"id": f["id"], "name": upload["filename"], "title": f.get("title")})
                return 200, {}, {"ok": True, "files": done}
            if not body.get("channel") or body["channel"] in self.missing_channels:
                return 200, {}, {"ok": False, "error": "channel_not_found"}
            self.messages.append(body)
            ts = f"{time.time():.6f}"
            self.message_ts.append(ts)
            return 200, {}, {"ok": True, "channel": "C0TEST", "ts": ts,
                             "message": {"type": "message", "text": body.get("text", ""), "ts": ts}}

    def receive_upload(self, file_id: str, data: bytes) -> bool:
        with self.lock:
            upload = self.uploads.get(file_id)
            if upload is None:
                return False
            upload["data"] = data
            return True

    def __enter__(self) -> "SlackTestServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
