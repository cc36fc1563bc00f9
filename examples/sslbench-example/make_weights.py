"""Writes the two weights files this example ships (run once; the cards pin their sha256).

timm's ``test_vit`` (a 64-wide, 160 px ViT with 0.3 M parameters) with seeded random weights, stored as
float16 to keep the package small (sslbench loads them into the float32 model). They show how a package
ships weights as package data; their features mean nothing.

- ``sslbench_example/cards/test_vit_moco.pth``: the layout of MoCo's training checkpoints
  (``{"epoch", "arch", "state_dict": {"module.encoder_q.…", …}}`` with the projection head and the queue),
  read by the card ``test_vit.example_moco`` (a ``file`` source, relative to the card file).
- ``sslbench_example/weights/test_vit.pth``: a plain timm state dict, read by the card
  ``test_vit.example_package`` (a ``package`` source).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

HERE = Path(__file__).parent / "sslbench_example"


def seeded_state(seed: int) -> dict[str, torch.Tensor]:
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    generator = torch.Generator().manual_seed(seed)
    return {key: (0.02 * torch.randn(v.shape, generator=generator)).half() for key, v in model.state_dict().items()}


def main() -> None:
    moco = {f"module.encoder_q.{key}": value for key, value in seeded_state(0).items()}
    generator = torch.Generator().manual_seed(2)
    moco |= {
        "module.encoder_q.head.0.weight": torch.randn(64, 64, generator=generator).half(),
        "module.encoder_q.head.2.weight": torch.randn(16, 64, generator=generator).half(),
        "module.queue": torch.randn(16, 32, generator=generator).half(),
    }
    torch.save({"epoch": 200, "arch": "test_vit", "state_dict": moco}, HERE / "cards" / "test_vit_moco.pth")
    torch.save(seeded_state(1), HERE / "weights" / "test_vit.pth")


if __name__ == "__main__":
    main()
