"""The `robustify` command line (click): local engine runs, the service, and a client of its API.

cli.main holds the command group; each module adds its commands (local, service, demo, client).
The modules import torch, the web stack and the SDK's heavier parts only inside the commands that
need them, so `robustify jobs get` never imports torch and `robustify finetune` never imports the
web stack; cli.docgen writes docs/cli.md from the command tree.
"""
