"""A third-party-style HTTP server for the drain test: `/` answers at once with the host name,
`/stream?n=N` sends one chunk a second for N seconds. On SIGTERM it stops accepting at once (as
nginx and most servers do) and exits once its in-flight requests have finished."""

import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOST = socket.gethostname()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 3   # an idle keep-alive connection ends after this, so a stop waits for real requests only

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/stream":
            n = int(parse_qs(url.query).get("n", ["5"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                line = f"{HOST} {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(1)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = f"{HOST}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"{time.time():.3f} {self.address_string()} {fmt % args}", flush=True)


server = ThreadingHTTPServer(("0.0.0.0", 80), Handler)
server.daemon_threads = False  # server_close() joins the in-flight requests


def on_term(_sig, _frame):
    print(f"{time.time():.3f} SIGTERM: closing the listener, finishing in-flight requests", flush=True)
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, on_term)
server.serve_forever()
server.server_close()
print(f"{time.time():.3f} drained, exiting", flush=True)
