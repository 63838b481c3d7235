"""Hard bounds of request fields, shared by the engine's configs and the service's forms.

They keep one request from asking for years of compute or numbers the database cannot store;
deployment limits that an operator may tune are fields of core.service.settings.Settings.
"""
MAX_SEED = 2**31 - 1              # stored in a 32-bit integer column
MAX_STEPS = 10_000                # attack / evaluation steps of one run
MAX_EXAMPLES = 10_000_000         # images evaluated or trained on
MAX_RADIUS = 1e3                  # a threat radius δ (images live in [0, 1])
MAX_STEP_RATIO = 100.0            # α = ratio·δ/K
MAX_BETA = 1e3                    # TRADES weight β
MAX_NUM_CLASSES = 100_000         # class count of a model or labels range of a data set
MAX_SWEEP_CHILDREN = 16           # fine-tunes one sweep job starts (the product of its value lists)
MAX_EVENT_ID = 2**63 - 1          # job event ids are 64-bit integers
MAX_CACHE_ENTRY_BYTES = 256 * 1024 * 1024   # a measurement-cache entry (corrupted test images above it are made afresh)
