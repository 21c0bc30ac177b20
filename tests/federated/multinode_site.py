"""One process of a site, as ``torchrun`` starts it on each node; ``test_multinode.py`` launches it.

    torchrun --nnodes 2 --node_rank K --nproc_per_node 1 --master_addr A --master_port P multinode_site.py ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from federated_toys import LocalSnapshots, ToyRegressor, quiet_process, site_data, state_of  # noqa: E402

from timeouts import scaled  # noqa: E402

from neurofed.federated import FederatedTrainer, Federation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--fed-port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    quiet_process()
    L.seed_everything(10 + args.site)
    snapshots = LocalSnapshots()
    trainer = FederatedTrainer(
        rounds=2, accelerator="cpu", devices=1, num_nodes=args.nodes, logger=False, enable_progress_bar=False,
        default_root_dir=args.out, callbacks=[snapshots],
        federation=Federation(port=args.fed_port, site_rank=args.site, num_sites=2, timeout_s=scaled(60)),
    )
    model = ToyRegressor()
    data = site_data(args.site, n_test=7)
    trainer.fit(model, data)
    results = trainer.test(model, data)
    node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))
    torch.save(
        {"local": snapshots.states[-1], "final": state_of(model), "n_train": data.n_train, "test": results,
         "world_size": trainer.fabric.world_size, "global_rank": trainer.fabric.global_rank,
         "has_group": trainer.group is not None},
        Path(args.out) / f"result-{args.site}-{node}.pt",
    )
    trainer.close()


if __name__ == "__main__":
    main()
