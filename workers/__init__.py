"""arq workers: thin job functions that each call one ``billing`` function.

Auto-recharge, monthly invoices, notifications and the safety-net sweep arrive with
issue 4 (part 3); nothing in the service enqueues jobs yet.
"""
