"""Opaque global ids (``base64url("Kind:uuid")``) and history cursors."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime

from billing.history import Position


def encode(kind: str, value: uuid.UUID | str) -> str:
    raw = f"{kind}:{value}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(kind: str, global_id: str) -> uuid.UUID | None:
    """The uuid inside ``global_id`` if it is a ``kind`` id; ``None`` if it is not one."""
    if not global_id or len(global_id) > 200:
        return None
    try:
        raw = base64.urlsafe_b64decode(global_id + "=" * (-len(global_id) % 4)).decode()
        prefix, _, value = raw.partition(":")
        return uuid.UUID(value) if prefix == kind else None
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def encode_cursor(created_at: datetime, entry_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(entry_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position | None:
    if not cursor or len(cursor) > 200:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, entry = json.loads(raw)
        if not isinstance(created, str) or not isinstance(entry, str):
            return None
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            return None
        return Position(at.astimezone(UTC), uuid.UUID(entry))
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        # OverflowError: a time near year 1 or 9999 whose offset takes it out of range
        return None
