"""A short demo of LRControl-v0: a few episodes with simple hand-written controllers.

Run: ``python -m envs.demo``
"""

from __future__ import annotations

import numpy as np

from envs import VALIDATION_FAMILIES, EnvConfig, LRControlEnv


def main() -> None:
    env = LRControlEnv(EnvConfig(families=VALIDATION_FAMILIES))
    controllers = {"constant (a=0)": lambda obs: 0.0, "halve every epoch (a=-1)": lambda obs: -1.0,
                   "double every epoch (a=+1)": lambda obs: 1.0}
    print(f"{'family':18s} {'controller':26s} {'epochs':>6s} {'return':>8s} {'final val':>10s}")
    for family in ("diabetes_mlp", "blobs_mlp"):
        for name, policy in controllers.items():
            obs, info = env.reset(seed=0, options={"family": family})
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(np.array([policy(obs)], dtype=np.float32))
                total += reward
                done = terminated or truncated
            print(f"{family:18s} {name:26s} {info['epoch']:6d} {total:8.3f} {info['val_loss']:10.4f}")


if __name__ == "__main__":
    main()
