"""The artifact store (a local folder or S3-compatible object storage) and its blob cache."""
