"""billing.recharge.runs."""
