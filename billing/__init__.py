"""The Purchase Credits domain: ledger, cards, purchases, usage, pricing and gateways.

Nothing here imports ``api`` or ``workers``; callers own the transaction.
"""
