"""A trainer for the chaos soak: every state is a known function of its step.

    python tests/chaos_trainer.py CONFIG STEPS STEP_SECONDS

It restores the newest checkpoint on either tier (checking it is exactly ``state_at(step)``),
then saves every local period, synchronously, printing ``COMMITTED step=N`` once each save is on
disk. SIGTERM writes a preemption checkpoint and exits; kill -9 is what the soak uses.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import tiered


def state_at(step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.arange(250_000, dtype=np.float32) * 0.5 + step,
        "step": np.asarray(step, np.int64),
    }


def main() -> int:
    config, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with tiered.CheckpointManager(config) as mgr:
        restored = mgr.restore(state_at(0))
        start = 0
        if restored is not None:
            expected = state_at(restored.step)
            ok = all(np.array_equal(restored.state[k], expected[k]) for k in expected)
            print(f"RESTORED step={restored.step} from={restored.source} ok={ok}", flush=True)
            if not ok:
                return 3
            start = restored.step + 1
        else:
            print("FRESH", flush=True)
        for step in range(start, steps):
            time.sleep(pause)
            if mgr.save(step, state_at(step)):
                mgr.wait_until_finished()
                print(f"COMMITTED step={step}", flush=True)
            if mgr.should_stop():
                print(f"STOPPED step={step}", flush=True)
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
