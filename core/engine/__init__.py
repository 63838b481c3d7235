"""The ML engine: attacks, architectures, recipes, data, threats and losses.

It imports nothing from core.service or core.storage, so it runs in a notebook or a local
command without the service's database, broker or artifact store.
"""
