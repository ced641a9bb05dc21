"""Preemption notices: the AWS and GCP metadata endpoints, served by a local HTTP server
on 127.0.0.1 that behaves like the real ones (404 / FALSE until the notice, then the
documented body), SIGTERM in a plain process, and the grace-period deadline."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mamba_slm.platform.fault.preemption import (AwsSpotNotice, GcpPreemptedNotice, PreemptionWatcher,
                                                 SigtermNotice, build_notices)
from mamba_slm.platform.fault.worker import AutoCadence


class FakeMetadata(BaseHTTPRequestHandler):
    """EC2 IMDSv2 and GCE metadata in one server; `preempted` flips both to 'notice'."""
    preempted = False
    token = "imds-token-123"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: str = "") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, self.token)
        return self._send(400)

    def do_GET(self):
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != self.token:
                return self._send(401)
            if not type(self).preempted:
                return self._send(404)
            return self._send(200, json.dumps({"action": "terminate", "time": "2026-11-27T16:30:00Z"}))
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403)
            return self._send(200, "TRUE" if type(self).preempted else "FALSE")
        return self._send(404)


@pytest.fixture
def metadata_server():
    FakeMetadata.preempted = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cloud_notices_against_a_local_metadata_server(metadata_server):
    aws, gcp = AwsSpotNotice(metadata_server), GcpPreemptedNotice(metadata_server)
    assert aws.poll() == "" and gcp.poll() == ""
    FakeMetadata.preempted = True
    assert aws.poll() == "AWS spot terminate at 2026-11-27T16:30:00Z"
    assert gcp.poll() == "GCP preemption"
    # Off the cloud (nothing listening) a notice is simply never seen.
    assert AwsSpotNotice("http://127.0.0.1:9", timeout_s=0.2).poll() == ""


def test_watcher_polls_in_the_background_and_enforces_the_deadline(metadata_server):
    deadline_hit = threading.Event()
    watcher = PreemptionWatcher(build_notices("gcp", gcp_url=metadata_server), grace_s=0.5,
                                poll_every_s=0.05, on_deadline=deadline_hit.set).start()
    time.sleep(0.2)
    assert watcher.check() == ""
    FakeMetadata.preempted = True
    for _ in range(100):
        if watcher.reason:
            break
        time.sleep(0.02)
    assert watcher.reason == "GCP preemption"
    assert deadline_hit.wait(2.0), "the grace deadline did not fire"
    watcher.stop()


def test_sigterm_is_a_notice_not_an_exit():
    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher([SigtermNotice()], grace_s=30).start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs on the main thread between bytecodes
        assert watcher.check().startswith("SIGTERM")
    finally:
        watcher.stop()
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler was not restored"


def test_bad_notice_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="subset of"):
        build_notices("sigterm,azure")


def test_auto_cadence_is_young_daly_in_steps():
    cadence = AutoCadence(preemptions_per_node_hour=1.0, nodes=2)  # MTBF 1800 s
    assert cadence.due(1)  # nothing measured yet: checkpoint once to measure
    for _ in range(10):
        cadence.observe_step(0.5)
    line = cadence.observe_write(8.0)
    # Daly: sqrt(2*8*1800) * (1 + sqrt(8/3600)/3 + (8/3600)/9) - 8 = 164.41 s -> 329 steps of 0.5 s
    assert cadence.interval_steps == 329, line
    assert not cadence.due(328) and cadence.due(329)
    assert "every 329 steps" in line and "write 8 s" in line


def test_a_checkpoint_slower_than_the_grace_period_is_warned_about_once():
    from mamba_slm.platform.fault.worker import WorkerFaultTolerance
    from mamba_slm.platform.train.config import RunConfig, TrainingConfig
    from mamba_slm.platform.train.state import TrainState

    said = []
    ft = WorkerFaultTolerance(TrainingConfig(checkpoint_every=2), RunConfig(preemption_grace_s=10.0,
                              preemption_notices=""), rank=0, world=1, resume_dir=None, message=said.append)
    try:
        ft.after_step(TrainState(), step_time=3.0)
        ft.checkpoint_written(2, 6.0)  # 3 + 6 s fit in 10 s
        assert said == []
        ft.checkpoint_written(4, 8.0)  # 3 + 8 s do not
        ft.checkpoint_written(6, 9.0)
    finally:
        ft.close()
    assert len(said) == 1 and "took 8.0 s (+ a 3.0 s step)" in said[0] and "grace period of 10 s" in said[0]
    assert "--preemption-grace-s" in said[0]
