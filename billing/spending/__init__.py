"""billing.spending."""
