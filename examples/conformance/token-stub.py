#!/usr/bin/env python3
"""A stand-in OAuth token endpoint for trying bulk export clients locally.

It answers every POST with the one fixed bearer token given on the command
line, so a client that insists on a client-credentials exchange (such as
bulk_fhir_fetch) can talk to `go run ./examples/server -clients NAME=TOKEN`.
It checks nothing: never expose it beyond loopback, never use it for real data.

    python3 examples/conformance/token-stub.py 127.0.0.1:18190 s3cret
    # token URL: http://127.0.0.1:18190/token
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: token-stub.py HOST:PORT TOKEN")
    host, _, port = sys.argv[1].rpartition(":")
    token = sys.argv[2]
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        sys.exit("token-stub.py listens on loopback only")
    body = json.dumps({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": 300,
        "scope": "system/*.read",
    }).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            sys.stderr.write("token-stub: " + (fmt % args) + "\n")

    HTTPServer((host.strip("[]"), int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
