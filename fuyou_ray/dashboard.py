"""A small HTTP client of the Ray dashboard: jobs, actors and the metrics agents' Prometheus text.

Used by `fuyou-ray status` and by the dashboard tests. It talks HTTP only (no `ray.init`, so it is quick
and never joins the cluster as a driver) and handles Ray 2.60's token authentication itself: the token
comes from `token=`, else RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token
(where `ray get-auth-token --generate` and a first local `ray.init()` put it), and is sent as
`Authorization: Bearer ...` - Ray's own CLI sends it only under RAY_AUTH_MODE=token.

Where things are (Ray 2.60):
- GET /api/jobs/                      jobs, with submission_id, job_id, status, entrypoint
- GET /api/jobs/<submission_id>/logs  a submitted job's whole log
- GET /api/v0/actors?detail=true      the state API's actors (name, state, pid, num_restarts, job_id)
- GET /api/prometheus/sd              Prometheus HTTP service discovery: the metrics agents' host:port
- GET http://<host:port>/metrics      a metrics agent's Prometheus text (no token; ray_<name> series)
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class DashboardError(RuntimeError):
    """The dashboard could not be reached or refused us; the message says what to do."""


def dashboard_address(address: str | None = None) -> str:
    """`address`, else RAY_ADDRESS when it is a dashboard URL (as for `ray job submit`), else the default."""
    addr = address or os.environ.get("RAY_ADDRESS", "")
    if not addr.startswith(("http://", "https://")):
        addr = DEFAULT_ADDRESS if not address else f"http://{address}"
    return addr.rstrip("/")


def find_token(token: str | None = None) -> str | None:
    """The cluster's auth token, looked up where Ray keeps it (see the module docstring)."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH", ""), str(Path.home() / ".ray" / "auth_token")]
    for p in paths:
        if p and Path(p).is_file():
            text = Path(p).read_text().strip()
            if text:
                return text
    return None


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: metric name, labels and value."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, prefix: str = "") -> list[Sample]:
    """Samples of the Prometheus text format whose name starts with `prefix` (comments skipped)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(2) or "")}
        try:
            value = float(m.group(3))
        except ValueError:
            value = math.nan
        out.append(Sample(m.group(1), labels, value))
    return out


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class DashboardClient:
    """Reads jobs, actors and metrics of one Ray cluster through its dashboard (see module docstring)."""

    def __init__(self, address: str | None = None, token: str | None = None, timeout: float = 10.0) -> None:
        self.address = dashboard_address(address)
        self.token = find_token(token)
        self.timeout = timeout

    def _open(self, url: str, auth: bool = True) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise DashboardError(
                    f"{self.address} uses token authentication and no token was found: run this where "
                    "~/.ray/auth_token exists, or set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN); "
                    "`ray get-auth-token` prints the cluster's token"
                ) from exc
            if exc.code == 403:
                raise DashboardError(
                    f"{self.address} rejected the auth token: use the token of this cluster "
                    "(`ray get-auth-token` on its head node)"
                ) from exc
            raise DashboardError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DashboardError(
                f"cannot reach the Ray dashboard at {self.address} ({reason}): is Ray running "
                "(`ray start --head`)? pass its dashboard address with --address (or RAY_ADDRESS=http://...)"
            ) from exc

    def get_json(self, path: str) -> Any:
        body = self._open(self.address + path)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DashboardError(f"{self.address}{path}: not JSON (is this a Ray dashboard?)") from exc

    def jobs(self) -> list[dict[str, Any]]:
        jobs = self.get_json("/api/jobs/")
        return list(jobs) if isinstance(jobs, list) else []

    def job_logs(self, submission_id: str) -> str:
        return str(self.get_json(f"/api/jobs/{urllib.parse.quote(submission_id)}/logs").get("logs", ""))

    def actors(self, name_prefix: str = "") -> list[dict[str, Any]]:
        """The state API's actors (alive and dead) whose name starts with `name_prefix`."""
        body = self.get_json("/api/v0/actors?limit=10000&detail=true")
        rows = body.get("data", {}).get("result", {}).get("result", [])
        return [a for a in rows if (a.get("name") or "").startswith(name_prefix)] if name_prefix else rows

    def metrics_targets(self) -> list[str]:
        """host:port of every metrics agent, from the dashboard's Prometheus service discovery."""
        groups = self.get_json("/api/prometheus/sd")
        return sorted({t for g in groups or [] for t in g.get("targets", [])})

    def scrape(self, target: str) -> str:
        return self._open(f"http://{target}/metrics", auth=False).decode()

    def samples(self, prefix: str = "ray_fuyou_") -> list[Sample]:
        """Every metrics agent's samples whose name starts with `prefix` (agents that fail are skipped)."""
        out: list[Sample] = []
        for target in self.metrics_targets():
            try:
                out += parse_prometheus(self.scrape(target), prefix)
            except DashboardError:
                continue
        return out
