"""The object store goes away mid-job: one clear line, nothing partial, and a rerun finishes exactly once."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from talora.batch.commit import RunOutput
from talora.data.synthetic import write_demo_dataset
from talora.batch.parts import PARQUET
from tests.conftest import job_summary, run_job

pytestmark = pytest.mark.integration


class GatedStore:
    """A loopback HTTP proxy in front of the moto server that goes down (closes its connections and
    refuses new ones) right after it forwarded the first PUT whose path holds `down_after`: the
    store disappears exactly after the first committed shard, whatever the timing. `up()` brings
    it back on the same port."""

    def __init__(self, target: str, down_after: str) -> None:
        self.target, self.down_after, self.down = urlparse(target), down_after, False
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        store = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients use it

            def log_message(self, *args) -> None:
                pass

            def forward(self) -> None:
                if store.down:  # a connection left open from before: drop it unanswered
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                upstream = http.client.HTTPConnection(store.target.hostname, store.target.port, timeout=60)
                upstream.request(self.command, self.path, body, dict(self.headers))
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if self.command == "PUT" and store.down_after and store.down_after in self.path:
                    store.go_down()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        server = ThreadingHTTPServer(("127.0.0.1", port), Forward)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def go_down(self) -> None:
        self.down = True
        threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close()), daemon=True).start()

    def up(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.down, self.down_after = False, None
        self.server = self._serve(self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_store_going_away_mid_job_fails_in_one_line_and_the_rerun_finishes_exactly_once(ray_cluster, s3,
                                                                                           moto_server, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: the job's are what is tested here
    write_demo_dataset("s3://talora-test/gone", num_train=1, num_val=6, seed=4, shard_size=2, storage=s3)
    store = GatedStore(moto_server, down_after="/_manifests/")
    try:
        argv = ["--prompt", "segment vehicles", "--images", "s3://talora-test/gone/val/images", "--output",
                "s3://talora-test/gone-labels", "--s3-endpoint-url", store.url, "--points-per-side", "4",
                "--batch-size", "1", "--num-actors", "1"]
        done = run_job("segment_dataset", argv, ray_cluster)
        assert done.returncode == 3, done.stderr[-3000:]  # storage unavailable
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"segment_dataset: error: object storage at {store.url} did not answer"), last
        assert "rerun the same command" in last

        (run_key,) = {p.rsplit("/", 1)[-1] for p in _runs(s3)}
        run = RunOutput("s3://talora-test/gone-labels", run_key, s3, PARQUET)  # read past the proxy, from moto
        assert len(run.committed_shards()) == 1  # the one commit before the store went away; nothing partial

        store.up()
        second = job_summary(run_job("segment_dataset", argv, ray_cluster))
        assert second["images"] == 4  # only the two shards that were missing
        manifests = run.manifests()
        assert sorted(manifests) == ["shard-00000", "shard-00001", "shard-00002"]
        items = [i for m in manifests.values() for i in m.items]
        assert len(items) == len(set(items)) == 6 and not any(m.errors for m in manifests.values())
    finally:
        store.close()


def _runs(s3) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    return [p for p in fs.ls("talora-test/gone-labels") if not p.rsplit("/", 1)[-1].startswith("_")]
