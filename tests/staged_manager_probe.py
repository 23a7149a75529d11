"""One process of a 2-process job: process 0 opens and closes the orbax manager over a staged
step folder, as ``tiered.loading.Loader.load_needed`` does; process 1 does not (its staging
failed and it downloads the whole step, or its local part fits its mesh). Both then meet at one
barrier of the job. A manager that synchronised the job when it opened would meet process 1 at
that barrier under another name, and both would fail.

    python tests/staged_manager_probe.py CONFIG RANK PORT STAGED_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402

CONFIG, RANK, PORT, STAGED = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", num_processes=2, process_id=RANK, initialization_timeout=60
)
from jax.experimental import multihost_utils  # noqa: E402

from tiered.config_files import load_config  # noqa: E402
from tiered.orbax_api import local_manager  # noqa: E402

if RANK == 0:
    STAGED.mkdir(parents=True, exist_ok=True)
    mgr = local_manager(load_config(CONFIG), multi=True, directory=STAGED)
    mgr.all_steps()
    mgr.close()
else:
    time.sleep(3)  # the other path takes longer
multihost_utils.sync_global_devices("the job goes on")
print(f"PASSED {RANK}", flush=True)
