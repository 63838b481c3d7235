"""The robustify engine and everything the API and the workers share.

`core` never imports `api` or `worker`. Modules that need torch import it themselves, so
`core.config`, `core.settings` and `core.db` stay importable by the torch-free API process.
"""
