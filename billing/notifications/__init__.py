"""billing.notifications.outbox."""
