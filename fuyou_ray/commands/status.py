"""`fuyou-ray status`: the cluster's fuyou-ray jobs - step, loss, throughput, bottleneck, actor health."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EPILOG = """examples:
  fuyou-ray status                                   # the cluster of `ray start --head` on this machine
  fuyou-ray status --address http://127.0.0.1:8265   # or RAY_ADDRESS=http://...
  fuyou-ray status --all --json                      # finished jobs too, as JSON
It reads the Ray dashboard over HTTP: jobs, the fuyou:* actors (state, pid, restarts) and the live
fuyou metrics that the driver exports (step, loss, tokens/s, TFLOPS, ETA, bottleneck). When the cluster
exports no metrics it falls back to the last progress line of the job's log. Token authentication (Ray
2.60's default) is handled: the token comes from --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token.
exit codes: 0 shown; 1 the dashboard cannot be reached or refused the token."""

ACTIVE = {"PENDING", "RUNNING"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show running fuyou-ray jobs: step, loss, throughput, actor health",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", default=None, help="dashboard URL (default: RAY_ADDRESS or 127.0.0.1:8265)")
    p.add_argument("--token-file", default=None, help="file holding the cluster's auth token")
    p.add_argument("--all", action="store_true", help="include finished jobs")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fuyou_ray.dashboard import DashboardClient, DashboardError

    token = Path(args.token_file).read_text() if args.token_file else None
    client = DashboardClient(args.address, token=token)
    try:
        status = collect(client, include_finished=args.all)
    except DashboardError as exc:
        print(f"fuyou-ray: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def collect(client: Any, *, include_finished: bool = False) -> dict[str, Any]:
    """Jobs that run fuyou-ray (their entrypoint names it, or they own fuyou:* actors or metrics)."""
    from fuyou_ray.dashboard import DashboardError
    from fuyou_ray.progress import parse_line

    actors = client.actors("fuyou:")
    try:
        samples = client.samples("ray_fuyou_")
        metrics_note = "" if samples else "no fuyou metrics exported right now"
    except DashboardError as exc:
        samples, metrics_note = [], f"metrics unavailable: {exc}"
    live: dict[str, dict[str, Any]] = {}
    for s in samples:
        job = s.labels.get("job", "")
        entry = live.setdefault(job, {"run": s.labels.get("run", "")})
        _take(entry, s)
    jobs = []
    for job in client.jobs():
        job_id = job.get("job_id") or ""
        mine = [a for a in actors if a.get("job_id") == job_id]
        is_fuyou = "fuyou" in (job.get("entrypoint") or "") or mine or job_id in live
        if not is_fuyou or (job.get("status") not in ACTIVE and not include_finished):
            continue
        progress = live.get(job_id)
        source = "metrics" if progress else ""
        if progress is None and job.get("submission_id") and job.get("status") in ACTIVE:
            lines = client.job_logs(job["submission_id"]).splitlines()
            parsed = next((p for line in reversed(lines) if (p := parse_line(line))), None)
            if parsed:
                progress, source = parsed, "log"
        jobs.append(
            {
                "submission_id": job.get("submission_id"),
                "job_id": job_id,
                "status": job.get("status"),
                "entrypoint": job.get("entrypoint"),
                "progress": progress,
                "progress_from": source,
                "actors": [
                    {
                        "name": a.get("name"),
                        "state": a.get("state"),
                        "pid": a.get("pid"),
                        "restarts": int(a.get("num_restarts") or 0),
                        "death_cause": _death(a),
                    }
                    for a in sorted(mine, key=lambda a: a.get("name") or "")
                ],
            }
        )
    return {"dashboard": client.address, "jobs": jobs, "metrics_note": metrics_note}


def _take(entry: dict[str, Any], s: Any) -> None:
    """Fold one sample into a job's live progress."""
    names = {
        "ray_fuyou_step": "step",
        "ray_fuyou_target_steps": "total",
        "ray_fuyou_loss": "loss",
        "ray_fuyou_tokens_per_second": "tokens_per_s",
        "ray_fuyou_model_tflops": "tflops",
        "ray_fuyou_step_seconds": "seconds",
        "ray_fuyou_eta_seconds": "eta_s",
    }
    if s.name in names:
        entry[names[s.name]] = s.value
    elif s.name == "ray_fuyou_bottleneck" and s.value >= 1:
        entry["bottleneck"] = s.labels.get("lane", "").replace("_", " ")
    elif s.name == "ray_fuyou_busy_percent":
        entry.setdefault("busy_percent", {})[s.labels.get("lane", "").replace("_", " ")] = s.value
    elif s.name == "ray_fuyou_actor_restarts":
        entry.setdefault("restarts", {})[s.labels.get("role", "")] = int(s.value)


def _death(actor: dict[str, Any]) -> str | None:
    cause = actor.get("death_cause")
    if not cause:
        return None
    ctx = cause.get("actor_died_error_context") or {}
    return str(ctx.get("error_message") or cause)[:200]


def render(status: dict[str, Any]) -> str:
    from fuyou_ray.progress import format_duration

    lines = [f"dashboard {status['dashboard']}"]
    if not status["jobs"]:
        lines.append("no fuyou-ray jobs are running (--all shows finished ones)")
    for job in status["jobs"]:
        name = job["submission_id"] or f"driver {job['job_id']}"
        lines.append(f"job {name} [{job['status']}]  {job['entrypoint'] or ''}".rstrip())
        p = job["progress"]
        if p:
            step, total = int(p.get("step", 0)), int(p.get("total", 0) or 0)
            line = f"  step {step}/{total}" if total else f"  step {step}"
            if "loss" in p:
                line += f"  loss {p['loss']:.4f}"
            if "tokens_per_s" in p:
                line += f"  {p['tokens_per_s']:,.0f} tok/s"
            if "tflops" in p:
                line += f"  {p['tflops']:.4g} TFLOPS"
            if "seconds" in p:
                line += f"  {p['seconds']:.3g} s/step"
            if p.get("eta_s") is not None:
                line += f"  eta {format_duration(p['eta_s'])}"
            elif p.get("eta"):
                line += f"  eta {p['eta']}"
            if p.get("bottleneck"):
                busy = (p.get("busy_percent") or {}).get(p["bottleneck"], p.get("bottleneck_percent"))
                line += f"  bottleneck {p['bottleneck']}" + (f" {busy:.0f}%" if busy is not None else "")
            lines.append(
                line + (f"  (from the {job['progress_from']})" if job["progress_from"] == "log" else "")
            )
        else:
            lines.append("  no progress yet")
        for a in job["actors"]:
            health = f"  {a['name']:<22} {a['state']:<10} pid {a['pid']}  restarts {a['restarts']}"
            if a["death_cause"] and a["state"] == "DEAD":
                health += f"  ({a['death_cause']})"
            lines.append(health)
    if status.get("metrics_note"):
        lines.append(f"({status['metrics_note']})")
    return "\n".join(lines)
