"""The robustify engine and everything the API and the workers share.

`core` never imports `api` or `worker`. Modules that need torch import it themselves, so
`core.engine.config`, `core.service.settings` and `core.service.db` stay importable by the torch-free API process.
"""
