"""A cluster's teardown leaves the machine as it was: everything a run creates is listed and gone.

Its own one-node cluster (the module cluster of test_cluster.py is shared by many tests), with
zeroproxy deployed and a workload pod, so containers, pod netns, overlay snapshots, kubelet
volumes, v1 and v2 cgroups, bpffs pins and kubeadm state all exist before the teardown.
"""

from __future__ import annotations

import pytest

from zeroproxy import kubecluster as kc

pytestmark = pytest.mark.timeout(900)


def test_teardown_leaves_nothing_behind() -> None:
    kc.cleanup_stale()
    before = kc.machine_snapshot()
    cluster = kc.KubeCluster(1, proxy="zeroproxy")
    try:
        cluster.up()
        kc.apply(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"app": "p"}},
                           "spec": {"containers": [{"name": "c", "image": kc.AGNHOST_IMAGE, "args": ["pause"],
                                                    "imagePullPolicy": "Never"}]}}, namespace="default")
        kc.wait_ready(cluster, "default", "app=p", 1)
        during = kc.machine_snapshot()
        # The snapshot sees what a cluster creates (so an empty diff below means something).
        assert set(during["netns"]) - set(before["netns"]), "no netns while the cluster is up?"
        assert [c for c in during["cgroups"] if cluster.id in c]
        assert [p for p in during["processes"] if p.startswith("kubelet")]
        assert [s for s in during["state"] if cluster.id in s]
    finally:
        cluster.close()
    after = kc.machine_snapshot()
    left = {k: sorted(set(after[k]) - set(before[k])) for k in after}
    assert not any(left.values()), left
