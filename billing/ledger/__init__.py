"""billing.ledger.posting."""
