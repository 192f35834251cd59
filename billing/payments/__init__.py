"""billing.payments."""
