"""billing.settlement.booking."""
