"""`psd status` keeps working on a long-lived cluster whose status outgrows the 64 KiB a
daemon accepts in a request header (many tables, jobs and servers)."""
import json
import subprocess
import sys

import psd


def test_a_status_over_64_kib_reaches_the_cli_and_the_client():
    with psd.LocalCluster(servers=1) as cluster:
        with psd.connect(cluster) as kv:
            for i in range(400):
                kv.table(f"t{i:03d}_" + "x" * 150, width=1, dtype="int32")
            st = kv.status()
            assert len(st["tables"]) == 400
            assert len(json.dumps(st)) > 64 * 1024  # the point of the test
            out = subprocess.run([sys.executable, "-m", "psd", "status", "--scheduler", cluster.scheduler, "--json"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert len(json.loads(out.stdout)["tables"]) == 400
