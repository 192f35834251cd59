"""Every job id, built here and nowhere else.

Job ids are deterministic: the same piece of work enqueued twice (by the request that
caused it and by the sweep that heals a lost enqueue, say) runs once. Each id names the
work and the one occasion it is for: a try of a notice, a threshold crossing, a scheduled
run, an attempt of an invoice charge. A new occasion (a retry, a new crossing) gets a new
id, so arq does not take it for a finished job whose result it still keeps.
"""

from __future__ import annotations

from datetime import datetime


def notification_job_id(notification_id: int, attempts: int = 0) -> str:
    """One job id per try: a retry (``attempts`` moved on) is not taken for a finished job
    whose result arq still keeps, while the same try enqueued twice runs once."""
    return f"notification:{notification_id}:{attempts}"


def threshold_recharge(account_id: str, recharge_seq: int) -> str:
    """One job per threshold crossing: concurrent spends across one threshold queue one."""
    return f"recharge:{account_id}:{recharge_seq}"


def scheduled_recharge(account_id: str, due_at: datetime) -> str:
    return f"schedule:{account_id}:{due_at.isoformat()}"


def gateway_event(event_id: int, attempts: int | None = None) -> str:
    """The webhook's first enqueue (no ``attempts``), then one id per sweep retry: a kept
    (pending) event is tried again, not deduplicated."""
    if attempts is None:
        return f"gateway-event-{event_id}"
    return f"gateway-event-{event_id}-{attempts}"


def invoice_charge(invoice_id: object, attempt: int) -> str:
    """One job per charge attempt: a job delivered twice runs once."""
    return f"charge-invoice:{invoice_id}:{attempt}"


def cron_tick(name: str, tick: int) -> str:
    """A periodic job's run in the embedded ticker."""
    return f"cron:{name}:{tick}"


def after_outage(name: str, nonce: str) -> str:
    """A job started once after Redis came back (a fresh id each time)."""
    return f"{name}:after-outage:{nonce}"
