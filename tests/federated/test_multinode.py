"""A site larger than one machine: site 0 runs on two single-process "nodes" started by torchrun, site 1 on one.

Only site 0's global rank 0 joins the federation; DDP keeps the nodes identical; the global model is the
example-weighted mean of the two sites' local models, and each test scan is counted once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timeouts import STARTUP_S, scaled

from neurofed.federated.simulate import free_port

SCRIPT = Path(__file__).with_name("multinode_site.py")


@pytest.mark.slow
def test_a_site_on_two_torchrun_nodes_federates_with_a_one_node_site(tmp_path) -> None:
    fed_port, site_port = free_port(), free_port()
    common = ["--fed-port", str(fed_port), "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(site_port)]
    procs = [
        subprocess.Popen([*torchrun, "--node_rank", str(node), str(SCRIPT), "--site", "0", "--nodes", "2", *common],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--site", "1", "--nodes", "1", *common], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=scaled(STARTUP_S + 180))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(o[-3000:] for o in outputs)

    res = {key: torch.load(tmp_path / f"result-{key[0]}-{key[1]}.pt", weights_only=False)
           for key in ((0, 0), (0, 1), (1, 0))}
    assert [res[k]["world_size"] for k in res] == [2, 2, 1]
    assert [res[k]["global_rank"] for k in res] == [0, 1, 0]
    assert [res[k]["has_group"] for k in res] == [True, False, True]  # the second node never joined
    ref = res[0, 0]["final"]
    # aggregated entries: identical everywhere; BatchNorm statistics are each site's own (precise_bn), the same
    # on both nodes of site 0
    keys = [k for k, v in ref.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    for key in res:
        for k in keys:
            assert torch.equal(res[key]["final"][k], ref[k]), (key, k)
    for k in ref:
        assert torch.equal(res[0, 1]["final"][k], ref[k]), k
    assert torch.equal(res[0, 0]["local"]["conv.weight"], res[0, 1]["local"]["conv.weight"])  # DDP across nodes
    w = [float(res[0, 0]["n_train"]), float(res[1, 0]["n_train"])]
    for k in keys:
        expected = (w[0] * res[0, 0]["local"][k].double() + w[1] * res[1, 0]["local"][k].double()) / sum(w)
        torch.testing.assert_close(ref[k].double(), expected, rtol=1e-5, atol=1e-6)
    table = res[0, 0]["test"]
    assert table["toy0"]["n"] == 7 and table["toy1"]["n"] == 7 and table["pooled"]["n"] == 14
    assert res[0, 1]["test"] == table == res[1, 0]["test"]
