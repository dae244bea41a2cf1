"""The core stays pure: the kernel, policy, prediction and serving import neither grpc nor ray, and
nothing heavy (torch, transformers) happens at import time. (Which package may import which is
the import-linter contract in pyproject.toml, checked by scripts/lint.sh.)"""
import subprocess
import sys


def test_core_imports_neither_grpc_nor_ray_nor_torch():
    code = ("import sys, router.core.config, router.policy.selection, router.policy.budget, router.prediction.predictor, "
            "router.prediction.onboarding, router.prediction.artifact, router.serving.service, router.serving.app, "
            "datastore, encoders, backends; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'ray', 'torch', 'transformers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"core imported {out.stdout.strip()} {out.stderr.strip()[-500:]}"
