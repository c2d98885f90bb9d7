"""`comigs sync status`: the operator's view of a state directory, as a dict or as text.

Read straight from the database (WAL lets it run beside a live server), so it works whether or not
the coordinator is up, and shows exactly what a restarted coordinator would resume from.
"""

from __future__ import annotations

import time
from typing import Any

from sync_service.store import Store


def build_status(store: Store, rounds_limit: int = 10) -> dict[str, Any]:
    now = time.time()
    latest = store.latest_generalist()
    current = store.current_round()
    rounds = []
    for row in store.list_rounds(rounds_limit):
        rounds.append(
            {
                "round": row.round_id,
                "state": row.state,
                "base_version": row.base_version,
                "published_version": row.published_version,
                "uploads": store.count_uploads(row.round_id),
                "min_devices": row.config.get("min_devices"),
                "opened_at": row.opened_at,
                "deadline": row.deadline,
                "extensions": row.extensions,
                "closed_at": row.closed_at,
                "reason": row.reason,
            }
        )
    reports = store.latest_reports()
    devices = []
    for device in store.list_devices():
        report = reports.get(device.device_id)
        devices.append(
            {
                "device": device.device_id,
                "revoked": device.revoked,
                "created_at": device.created_at,
                "registered_at": device.registered_at,
                "capabilities": device.capabilities,
                "last_report": {"round": report[0], "at": report[1], **report[2]} if report else None,
            }
        )
    uploads = []
    if current is not None:
        for upload in store.uploads_for_round(current.round_id):
            uploads.append(
                {
                    "device": upload.device_id,
                    "num_samples": upload.num_samples,
                    "encoding": upload.encoding,
                    "bytes": upload.size,
                    "norm": upload.update_norm,
                    "clip_scale": upload.clip_scale,
                    "received_at": upload.received_at,
                }
            )
    return {
        "state_dir": str(store.root),
        "now": now,
        "manifest": {"tensors": len(store.manifest), "delta_bytes": store.manifest.nbytes},
        "generalist": {
            "version": latest.version,
            "sha256": latest.sha256,
            "bytes": latest.size,
            "round": latest.round_id,
            "created_at": latest.created_at,
        },
        "current_round": current.round_id if current else None,
        "rounds_published": store.count_rounds("published"),
        "rounds_failed": store.count_rounds("failed"),
        "rounds": rounds,
        "devices": devices,
        "current_round_uploads": uploads,
        "current_round_events": [
            {"at": at, "event": event, "detail": detail}
            for at, event, detail in (store.round_events(current.round_id) if current else [])
        ],
    }


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    delta = now - then
    future = delta < 0
    delta = abs(delta)
    text = (
        f"{delta:.0f}s" if delta < 120 else (f"{delta / 60:.0f}m" if delta < 7200 else f"{delta / 3600:.1f}h")
    )
    return f"in {text}" if future else f"{text} ago"


def render_status(status: dict[str, Any]) -> str:
    now = status["now"]
    gen = status["generalist"]
    lines = [
        f"state directory  {status['state_dir']}",
        f"manifest         {status['manifest']['tensors']} tensors, "
        f"{status['manifest']['delta_bytes'] / 1e6:.2f} MB per fp32 delta",
        f"generalist       version {gen['version']}  sha256 {gen['sha256'][:16]}  "
        f"({'initial' if gen['round'] is None else 'round ' + str(gen['round'])}, "
        f"{_ago(now, gen['created_at'])})",
        f"rounds           {status['rounds_published']} published, {status['rounds_failed']} failed, "
        f"current: {status['current_round'] if status['current_round'] is not None else 'none'}",
        "",
        "ROUND  STATE        BASE  PUBLISHED  UPLOADS  DEADLINE      REASON",
    ]
    for r in status["rounds"]:
        published = "-" if r["published_version"] is None else f"v{r['published_version']}"
        uploads = f"{r['uploads']}/{r['min_devices']}"
        deadline = _ago(now, r["deadline"]) if r["state"] in ("open", "collecting") else "-"
        lines.append(
            f"{r['round']:>5}  {r['state']:<11}  v{r['base_version']:<3}  {published:<9}  {uploads:<7}  "
            f"{deadline:<12}  {r['reason'] or ''}"
        )
    if not status["rounds"]:
        lines.append("    (no rounds yet: start `comigs sync serve`)")
    active = sum(1 for d in status["devices"] if not d["revoked"])
    lines += [
        "",
        f"DEVICES ({active} active, {len(status['devices']) - active} revoked)",
        "NAME                  STATUS    EXPERTS  RUNTIME            LAST REPORT",
    ]
    for d in status["devices"]:
        caps = d["capabilities"] or {}
        experts = f"{caps.get('num_generalists', '?')}G/{caps.get('num_experts', '?')}" if caps else "-"
        report = d["last_report"]
        if report:
            loss = report.get("valid_loss", report.get("train_loss"))
            report_text = f"round {report['round']} {_ago(now, report['at'])}" + (
                f" loss {loss:.4f}" if loss is not None else ""
            )
        else:
            report_text = "-"
        state = "revoked" if d["revoked"] else ("active" if d["registered_at"] else "enrolled")
        lines.append(
            f"{d['device']:<20}  {state:<8}  {experts:<7}  {caps.get('runtime', '-') or '-':<17}  "
            f"{report_text}"
        )
    if status["current_round"] is not None:
        lines += [
            "",
            f"UPLOADS IN ROUND {status['current_round']}",
            "DEVICE                SAMPLES  ENCODING  BYTES       NORM        RECEIVED",
        ]
        for u in status["current_round_uploads"]:
            clipped = " (clipped)" if u["clip_scale"] < 1.0 else ""
            lines.append(
                f"{u['device']:<20}  {u['num_samples']:>7}  {u['encoding']:<8}  {u['bytes']:<10}  "
                f"{u['norm']:<10.4g}  {_ago(now, u['received_at'])}{clipped}"
            )
        if not status["current_round_uploads"]:
            lines.append("    (none yet)")
    return "\n".join(lines)
