"""What users' stage scripts import (``dvcray_cli.integrations.dvclive``), and the hooks
Ray runs on the nodes (``runtime_env``, ``storage``). It stands alone: nothing else of
dvcray is imported here."""
