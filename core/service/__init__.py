"""Service plumbing: settings, database, API keys, queue, logs, webhooks and uploads."""
