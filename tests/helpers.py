"""Shared test helpers: where the offline Omniglot mirror is, and a loopback HTTP server for it."""
import functools
import http.server
import json
import os
import pathlib
import threading
from contextlib import contextmanager

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MIRROR = pathlib.Path(os.environ.get("SCRATCHPROTO_TEST_MIRROR", REPO.parent / "shared" / "data" / "omniglot"))

needs_mirror = pytest.mark.skipif(not (MIRROR / "images_background.zip").exists(),
                                  reason=f"no Omniglot mirror at {MIRROR} (set SCRATCHPROTO_TEST_MIRROR)")


@contextmanager
def http_mirror(folder):
    """Serve ``folder`` on 127.0.0.1 at a free port; yields the base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def trace_without_seconds(run_dir):
    """A run's trace.jsonl records without the wall-clock seconds, which differ from run to run, and
    without the run's progress (time left, epochs left), which depends on the epoch limit of the
    start that wrote each line: the results alone."""
    out = []
    for line in (pathlib.Path(run_dir) / "trace.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")
        r.pop("progress", None)
        out.append(r)
    return out
