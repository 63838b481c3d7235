"""The `robustify` command line: local engine runs, the service, and a client of its API.

Each subcommand module is imported only when used, so `robustify jobs status` never imports
torch and `robustify finetune` never imports the web stack.
"""
