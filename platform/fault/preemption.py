"""Preemption notices behind one interface: "is this node about to be taken away?"

- `SigtermNotice`: Kubernetes and the clouds send SIGTERM before reclaiming a node
  (then SIGKILL after the grace period: `terminationGracePeriodSeconds` on GKE/EKS).
- `AwsSpotNotice`: EC2 instance metadata `latest/meta-data/spot/instance-action`
  (IMDSv2 token first); 404 until AWS schedules the interruption, then a JSON body with
  `action` and `time`, two minutes ahead.
  https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html
- `GcpPreemptedNotice`: GCE metadata `computeMetadata/v1/instance/preempted`
  (header `Metadata-Flavor: Google`) answers TRUE once the VM is being preempted (~30 s).
  https://cloud.google.com/compute/docs/instances/create-use-preemptible#detecting_if_an_instance_was_preempted

`PreemptionWatcher` owns a set of notices: SIGTERM is caught at once, the HTTP ones
are polled by a daemon thread. The loop reads `watcher.reason` after every step.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Protocol

log = logging.getLogger(__name__)
AWS_METADATA = "http://169.254.169.254"
GCP_METADATA = "http://metadata.google.internal"
NOTICE_KINDS = ("sigterm", "aws", "gcp")


class PreemptionNotice(Protocol):
    def poll(self) -> str:
        """'' while the node is safe, else a short description of the notice."""


class AwsSpotNotice:
    def __init__(self, base_url: str = AWS_METADATA, timeout_s: float = 1.0):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s

    def _token(self) -> str | None:
        req = urllib.request.Request(f"{self.base_url}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError):
            return None  # IMDSv1-only instance: ask without a token

    def poll(self) -> str:
        token = self._token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        req = urllib.request.Request(f"{self.base_url}/latest/meta-data/spot/instance-action",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                body = json.loads(r.read().decode() or "{}")
        except (urllib.error.URLError, OSError, ValueError):
            return ""  # 404 = no interruption scheduled; unreachable = not on EC2
        return f"AWS spot {body.get('action', 'interruption')} at {body.get('time', '?')}"


class GcpPreemptedNotice:
    def __init__(self, base_url: str = GCP_METADATA, timeout_s: float = 1.0):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s

    def poll(self) -> str:
        req = urllib.request.Request(f"{self.base_url}/computeMetadata/v1/instance/preempted",
                                     headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                answer = r.read().decode().strip().upper()
        except (urllib.error.URLError, OSError):
            return ""
        return "GCP preemption" if answer == "TRUE" else ""


class SigtermNotice:
    """Turns SIGTERM into a notice instead of an immediate exit.

    Python lets only the main thread set signal handlers, and Ray Train runs the
    training function in a thread of the worker actor, whose main thread already has
    Ray's SIGTERM handler (`Worker.main_loop`: it exits through
    `ray._private.worker.raise_sys_exit_with_custom_error_message`). There we wrap that
    function, which the handler looks up at call time: the notice is recorded and the
    exit deferred to the end of the grace period. In a plain process (local mode, the
    main thread) a normal handler is installed."""

    def __init__(self):
        self.reason = ""
        self._restore: Callable[[], None] | None = None

    def _on_sigterm(self) -> None:
        self.reason = self.reason or f"SIGTERM at {time.strftime('%H:%M:%S')}"

    def install(self) -> "SigtermNotice":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: self._on_sigterm())
            self._restore = lambda: signal.signal(signal.SIGTERM, previous)
            return self
        import ray._private.worker as ray_worker

        original = ray_worker.raise_sys_exit_with_custom_error_message

        def deferred_exit(message: str, exit_code: int = 1):
            if "SIGTERM" in message:
                self._on_sigterm()
                return
            original(message, exit_code)

        ray_worker.raise_sys_exit_with_custom_error_message = deferred_exit
        self._restore = lambda: setattr(ray_worker, "raise_sys_exit_with_custom_error_message", original)
        return self

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def poll(self) -> str:
        return self.reason


class PreemptionWatcher:
    """SIGTERM plus polled cloud notices. `reason` is '' until any notice fires; from
    then on a deadline of `grace_s` runs, after which the process exits (the cloud
    would kill it anyway, and a hung collective must not outlive the node)."""

    def __init__(self, notices: list, grace_s: float = 30.0, poll_every_s: float = 5.0,
                 on_deadline: Callable[[], None] | None = None):
        self.notices, self.grace_s, self.poll_every_s = notices, grace_s, poll_every_s
        self.reason, self.noticed_at = "", None
        self._on_deadline = on_deadline or (lambda: os._exit(143))  # 128 + SIGTERM
        self._stop = threading.Event()
        self._deadline: threading.Timer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "PreemptionWatcher":
        for n in self.notices:
            if isinstance(n, SigtermNotice):
                n.install()
        if any(not isinstance(n, SigtermNotice) for n in self.notices):
            self._thread = threading.Thread(target=self._poll_loop, name="preemption-notices", daemon=True)
            self._thread.start()
        return self

    def check(self) -> str:
        """Poll the instant notices (SIGTERM); the HTTP ones are polled in the thread."""
        for n in self.notices:
            if isinstance(n, SigtermNotice) and n.poll():
                self._fire(n.poll())
        return self.reason

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_every_s if self.reason == "" else 3600):
            for n in self.notices:
                if not isinstance(n, SigtermNotice):
                    reason = n.poll()
                    if reason:
                        self._fire(reason)

    def _fire(self, reason: str) -> None:
        if self.reason:
            return
        self.reason, self.noticed_at = reason, time.monotonic()
        log.warning("preemption notice: %s; checkpointing within %.0f s", reason, self.grace_s)
        self._deadline = threading.Timer(self.grace_s, self._on_deadline)
        self._deadline.daemon = True
        self._deadline.start()

    def stop(self) -> None:
        self._stop.set()
        if self._deadline is not None:
            self._deadline.cancel()
        for n in self.notices:
            if isinstance(n, SigtermNotice):
                n.uninstall()


def build_notices(kinds: str, aws_url: str = AWS_METADATA, gcp_url: str = GCP_METADATA) -> list:
    """`kinds`: comma-separated subset of sigterm, aws, gcp ('' = none)."""
    out = []
    for kind in filter(None, (k.strip() for k in kinds.split(","))):
        if kind not in NOTICE_KINDS:
            raise ValueError(f"preemption notice {kind!r}: expected a comma-separated subset of {NOTICE_KINDS}")
        out.append({"sigterm": SigtermNotice, "aws": lambda: AwsSpotNotice(aws_url),
                    "gcp": lambda: GcpPreemptedNotice(gcp_url)}[kind]())
    return out
