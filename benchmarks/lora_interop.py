"""LoRA interop figures: adapter size against a full transformer checkpoint, and how close `--lora` is to peft.

1. Sizes: for the tiny and the 1B config, the files `save_lora` writes for a rank-R adapter on the attention
   projections (what `train --lora-rank R` puts in each checkpoint's lora/: the PEFT and the diffusers
   layout) against the transformer/ folder a full (or --save-merged) checkpoint holds. The 1B transformer is
   built on the meta device and its size computed from its parameter shapes (float32, as checkpoints store
   it); the adapters are real files.
2. Logits: a peft-built adapter (random non-zero A and B) on the tiny transformer, saved with peft's
   `save_pretrained` and with diffusers' `save_lora_weights` (official trainer: `unet.` prefix), loaded with
   `apply_lora`; max |logits - peft's logits| at scale 1 and 0.5, and for two adapters stacked.

    python benchmarks/lora_interop.py --rank 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sizes(rank: int, work: Path) -> None:
    from meissonic_cli.model.lora import LoRA, save_lora
    from meissonic_cli.model.transformer import MeissonicTransformer, build_on_meta, meissonic_1b, meissonic_tiny

    for name, config in (("tiny", meissonic_tiny()), ("1b", meissonic_1b())):
        if name == "tiny":
            model = MeissonicTransformer(config)
            model.save_pretrained(work / name / "transformer")
            full = folder_bytes(work / name / "transformer")
        else:
            model = build_on_meta(config)
            full = sum(p.numel() * 4 for p in model.state_dict().values())
        lora = LoRA(model, rank)
        lora.to_empty(device="cpu")
        with torch.no_grad():
            for p in lora.parameters():
                p.normal_()
        save_lora(work / name / "lora", lora, model=model)
        files = {p.name: p.stat().st_size for p in sorted((work / name / "lora").iterdir())}
        total = sum(files.values())
        print(f"{name}: rank {rank} on {len(lora.layer_names)} attention projections: lora/ {total / 2**20:.2f} MiB "
              f"({', '.join(f'{k} {v / 2**20:.2f} MiB' for k, v in files.items())}); transformer/ {full / 2**20:.1f} MiB "
              f"(x{full / total:.0f} the adapter folder, x{full / files['adapter_model.safetensors']:.0f} one layout)")


def logits_gap(work: Path) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from meissonic_cli.model.lora import apply_lora
    from meissonic_cli.model.transformer import MeissonicTransformer, meissonic_tiny

    def base() -> MeissonicTransformer:
        torch.manual_seed(0)
        return MeissonicTransformer(meissonic_tiny()).eval()

    g = torch.Generator().manual_seed(1)
    args = (torch.randint(0, 64, (2, 4, 4), generator=g), torch.randn(2, 77, 32, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([500.0]))
    kw = dict(micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]).expand(2, 5))

    def logits(model, specs=()):
        applied = apply_lora(model, list(specs), notify=None)
        with torch.no_grad():
            out = model(*args, **kw)
        for a in applied:
            a.remove()
        return out

    def randomize(model, seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def set_scale(model, scale, adapter="default"):
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_scale(adapter, scale)

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v"])  # the official trainer's
    model = get_peft_model(base(), config)
    randomize(model, 2)
    model.save_pretrained(work / "peft")
    StableDiffusionLoraLoaderMixin.save_lora_weights(work / "official", unet_lora_layers=get_peft_model_state_dict(
        model.get_base_model()))
    plain = logits(base())
    for scale in (1.0, 0.5):
        set_scale(model, scale)
        with torch.no_grad():
            ref = model.get_base_model()(*args, **kw)
        peft_gap = (logits(base(), [f"{work / 'peft'}:{scale}"]) - ref).abs().max().item()
        # The file has no alpha: alpha = rank is assumed, so the trained alpha/r = 2 goes into the scale.
        official = work / "official" / "pytorch_lora_weights.safetensors"
        diff_gap = (logits(base(), [f"{official}:{2 * scale}"]) - ref).abs().max().item()
        print(f"scale {scale}: max|ours - peft| PEFT folder {peft_gap:.2e}, official-trainer file {diff_gap:.2e} "
              f"(the adapter moves the logits by up to {(ref - plain).abs().max().item():.2f})")
    two = inject_adapter_in_model(config, base(), adapter_name="a")
    two = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_out"]), two, adapter_name="b")
    randomize(two, 3)
    for m in two.modules():
        if isinstance(m, BaseTunerLayer):
            m.set_adapter(["a", "b"])
    files = []
    for n in ("a", "b"):
        StableDiffusionLoraLoaderMixin.save_lora_weights(work / n, unet_lora_layers=get_peft_model_state_dict(
            two, adapter_name=n), unet_lora_adapter_metadata=two.peft_config[n].to_dict())
        files.append(work / n)
    with torch.no_grad():
        ref = two(*args, **kw)
    print(f"two adapters stacked: max|ours - peft| {(logits(base(), files) - ref).abs().max().item():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    a = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        sizes(a.rank, Path(tmp))
        logits_gap(Path(tmp))


if __name__ == "__main__":
    main()
