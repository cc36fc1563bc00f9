"""Extract a spec's features with a backbone that sleeps per batch, so a test can kill -9 it midway.

Usage: python slow_extract.py SPEC SECONDS_PER_BATCH   (the spec names the backbone ``slow_cnn``
through ``random_cnn``'s options; its cache_dir says where the features go)
"""

from __future__ import annotations

import sys
import time
import types

from sslbench import BackboneEntry, hookimpl, load_plugins
from sslbench.runner import extract_spec
from sslbench.spec import load_spec, resolve_spec
from sslbench_plugins.basic_backbones import RandomCNN, RandomCNNOptions

DELAY = float(sys.argv[2])


class SlowCNN(RandomCNN):
    def embed(self, batch):
        time.sleep(DELAY)
        return super().embed(batch)


@hookimpl
def sslbench_register_backbones(register):
    # Registered under the name the spec uses, replacing the built-in plugin that provides it.
    register(BackboneEntry("random_cnn", SlowCNN, "test", "random CNN that sleeps per batch", RandomCNNOptions))


def main(spec_path: str) -> None:
    import os

    os.environ["SSLBENCH_DISABLE_PLUGINS"] = "basic_backbones"
    plugins = load_plugins(
        extra=[("slow", types.SimpleNamespace(sslbench_register_backbones=sslbench_register_backbones))]
    )
    resolved = resolve_spec(load_spec(spec_path), plugins)
    for features in extract_spec(resolved, plugins, device="cpu"):
        for extracted in features.per_dataset:
            for name, got in extracted.items():
                print(name, got.features.shape, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
