"""The core stays pure: selection logic and the service import neither grpc nor ray, and nothing
heavy happens at import time."""
import subprocess
import sys


def test_core_imports_neither_grpc_nor_ray():
    code = ("import sys, router.policy, router.service, router.app, router.config, datastore, encoders, backends; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'ray', 'torch', 'transformers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"core imported {out.stdout.strip()}"
