"""One fake-GPU Ray cluster per test module: two emulated nodes with 2 declared GPUs each on this
CPU machine (ray.cluster_utils.Cluster starts a head and a second raylet, as `ray start
--num-gpus=2` twice would). Ray hands out GPU ids and CUDA_VISIBLE_DEVICES for declared GPUs as on
a real node; torch.cuda stays unavailable, so processes run the CPU twins."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    tmp = f"/tmp/mdnclu-{os.getpid()}"
    # both emulated nodes live on this machine (its own address, as a local ray.init uses)
    node = {"num_cpus": 4, "num_gpus": 2, "object_store_memory": 100 * 1024 * 1024}
    os.makedirs("/tmp/ray", exist_ok=True)  # Cluster.add_node records the head's address there
    cluster = Cluster(initialize_head=True, head_node_args={**node, "temp_dir": tmp, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
