"""SeqIO task and mixture registrations, on import: `kilt_<task>` and `kilt_all` (tasks.kilt), the demo
world's `lumenvq_demo_<task>` and `lumenvq_demo_all` (tasks.demo), and the debug tasks (tasks.debug).
"""

from tasks import debug, demo, kilt  # noqa: F401  (imported to register)
