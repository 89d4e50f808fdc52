"""The masked image modeling trainer behind `meissonic train` (paper sections 2.2, 2.4, 2.5).

One optimizer step, on every process:
1. Read `batch_size x grad_accum` samples from this process's share of the token shards (VQ codes,
   CLIP features and micro-conditions written by `meissonic tokenize`; nothing is re-encoded).
2. Per sample draw a masking rate r = cos(pi/2 u), u ~ U(0,1) (density 2/pi (1-r^2)^-1/2), clipped
   below by --min-masking-rate; replace round(L r) tokens (at least one), chosen by a random
   permutation, with the mask id.
3. With probability --cond-dropout swap the text sequence and pooled embedding for the empty
   prompt's (classifier-free guidance).
4. Forward with timestep = r * 1000, the scale the released model was trained with (its forward
   multiplies by 1000 again), and cross-entropy on the masked positions only.
5. AdamW step after gradient clipping; a non-finite loss or gradient skips the step, and
   --nan-patience consecutive bad steps reload the last checkpoint (paper 2.2: "gradient clipping
   and checkpoint reloading").

The same code runs on one device or under torchrun (DDP, or FSDP with --fsdp); each rank reads its
own shards and only rank 0 logs and writes. Checkpoints (see `checkpoint.py`) hold everything needed
for a resumed run to reproduce the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meissonic_cli.train import checkpoint as ckpt
from meissonic_cli.atomic import atomic_write, write_json, write_text
from meissonic_cli.errors import ConfigError, InputError, MeissonicError, OutputExistsError
from meissonic_cli.model.lora import LoRA, merge_adapters, save_lora, read_lora_file
from meissonic_cli.model.transformer import (
    CONFIG_NAME,
    NAMED_CONFIGS,
    MeissonicTransformer,
    TransformerConfig,
    build_on_meta,
    check_state_dict,
    image_ids,
    load_state_dict_files,
    transformer_folder,
)
from meissonic_cli.progress import make_progress
from meissonic_cli.data.shards import TokenSample, list_token_shards, rank_shards, read_dataset_info, read_token_shard
from meissonic_cli.train.config import TrainConfig

IGNORE_INDEX = -100
# What a checkpoint borrows from the base model to be a whole released-layout folder.
BASE_MODEL_PARTS = ("model_index.json", "vqvae", "tokenizer", "scheduler", "text_encoder")
COMPRESSION_PREFIXES = ("down_block.", "up_block.")
# A reload that lands on the same checkpoint this many times in a row means the run cannot recover.
MAX_RELOADS_PER_CHECKPOINT = 3


class TrainingDivergedError(MeissonicError):
    """The loss stayed non-finite and reloading checkpoints did not help."""


# ----------------------------------------------------------------------------------------------
# Objective


def sample_masking_rates(n: int, generator: torch.Generator, min_rate: float = 0.0) -> torch.Tensor:
    """`n` masking rates r = cos(pi/2 u), u ~ U(0,1), clipped below at `min_rate` (float32)."""
    u = torch.rand(n, generator=generator)
    return torch.cos(u * (math.pi * 0.5)).clamp(min=min_rate)


def mask_tokens(
    codes: torch.Tensor, rates: torch.Tensor, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask round(L r) positions per sample (at least one), chosen by a random permutation.

    Returns `(inputs, labels)` shaped like `codes` (B, H, W): inputs hold `mask_id` where masked,
    labels hold the true code where masked and -100 elsewhere.
    """
    b = codes.shape[0]
    flat = codes.reshape(b, -1)
    length = flat.shape[1]
    n_masked = (length * rates).round().clamp(min=1)
    # A position is masked when its rank in a random permutation is below the count.
    rank = torch.rand(b, length, generator=generator).argsort(dim=-1)
    masked = rank < n_masked[:, None]
    inputs = torch.where(masked, torch.full_like(flat, mask_id), flat)
    labels = torch.where(masked, flat, torch.full_like(flat, IGNORE_INDEX))
    return inputs.reshape(codes.shape), labels.reshape(codes.shape)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions; logits (B, K, H, W), labels (B, H, W) with -100 elsewhere."""
    b, k = logits.shape[:2]
    return F.cross_entropy(logits.reshape(b, k, -1).float(), labels.reshape(b, -1), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class DataCursor:
    """Where a rank's stream continues: epoch, position in that epoch's shard order, samples taken from it."""

    epoch: int = 0
    position: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class Batch:
    codes: torch.Tensor  # (B, H, W) int64
    micro: torch.Tensor  # (B, 5) float32
    text: torch.Tensor | None  # (B, T, D) float32, stored features
    pooled: torch.Tensor | None  # (B, P) float32
    captions: list[str]


class ShardStream:
    """This rank's endless, exactly resumable stream of token samples.

    Each epoch visits the rank's shards in a seeded order and each shard's samples in a seeded
    order (a whole shard is read into memory for that); the next shard is read in a background
    thread. The cursor always points at the next sample, so a checkpoint taken between batches
    resumes at the same sample.
    """

    def __init__(self, shards: list[Path], *, seed: int, shuffle: bool, cursor: DataCursor | None = None):
        self.shards = shards
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = cursor or DataCursor()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self._loaded: dict[tuple[int, int], Future] = {}

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return order

    def _read(self, epoch: int, position: int) -> list[TokenSample]:
        index = self._order(epoch)[position]
        samples = list(read_token_shard(self.shards[index]))
        if self.shuffle:
            # Shuffle from key order, not file order: img2dataset writes a shard's images in the order
            # their downloads finish, so the same data would otherwise train in another order each time.
            samples.sort(key=lambda sample: sample.key)
            perm = np.random.default_rng([self.seed, epoch, index, 1]).permutation(len(samples))
            samples = [samples[i] for i in perm]
        return samples

    def _following(self, epoch: int, position: int) -> tuple[int, int]:
        return (epoch, position + 1) if position + 1 < len(self.shards) else (epoch + 1, 0)

    def _get(self, key: tuple[int, int]) -> Future:
        if key not in self._loaded:
            self._loaded[key] = self._pool.submit(self._read, *key)
        return self._loaded[key]

    def __next__(self) -> TokenSample:
        empty_in_a_row = 0
        while True:
            c = self.cursor
            key = (c.epoch, c.position)
            samples = self._get(key).result()
            self._get(self._following(*key))  # prefetch
            if c.offset < len(samples):
                sample = samples[c.offset]
                c.offset += 1
                if c.offset >= len(samples):
                    self._advance()
                return sample
            empty_in_a_row += 1
            if empty_in_a_row > len(self.shards):
                raise InputError(f"every token shard of this rank is empty ({self.shards[0].parent}); rerun `meissonic tokenize`")
            self._advance()

    def cursor_record(self) -> dict[str, Any]:
        """The cursor plus the name of the shard it points into, for data_cursor.json."""
        shard = self.shards[self._order(self.cursor.epoch)[self.cursor.position]]
        return {**self.cursor.to_dict(), "shard": shard.name}

    def __iter__(self) -> Iterator[TokenSample]:
        return self

    def _advance(self) -> None:
        c = self.cursor
        self._loaded.pop((c.epoch, c.position), None)
        c.epoch, c.position = self._following(c.epoch, c.position)
        c.offset = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def collate(samples: list[TokenSample], *, grid: int, codebook_size: int, use_stored_text: bool,
            score: float | None, source: str = "") -> Batch:
    """Stack samples into a batch, checking each code grid against the training resolution."""
    for s in samples:
        if tuple(s.codes.shape) != (grid, grid):
            raise InputError(
                f"{source}: sample {s.key!r} has a {s.codes.shape[0]}x{s.codes.shape[1]} code grid but --resolution "
                f"and --vq-factor expect {grid}x{grid}; train at the resolution the shards were tokenized at"
            )
    codes = torch.from_numpy(np.stack([s.codes for s in samples]).astype(np.int64))
    if int(codes.max()) >= codebook_size:
        raise InputError(
            f"{source}: codes reach {int(codes.max())} but the model's codebook has {codebook_size} entries; the shards "
            "were tokenized with a different VQ model"
        )
    micro = torch.from_numpy(np.stack([s.micro for s in samples]).astype(np.float32))
    if score is not None:
        micro[:, 4] = score
    text = pooled = None
    if use_stored_text:
        missing = [s.key for s in samples if s.text is None or s.pooled is None]
        if missing:
            raise InputError(f"{source}: sample {missing[0]!r} has no stored text features although dataset.json says full")
        text = torch.from_numpy(np.stack([s.text for s in samples]).astype(np.float32))
        pooled = torch.from_numpy(np.stack([s.pooled for s in samples]).astype(np.float32))
    return Batch(codes=codes, micro=micro, text=text, pooled=pooled, captions=[s.caption for s in samples])


# ----------------------------------------------------------------------------------------------
# Model


def resolve_model_config(cfg: TrainConfig) -> TransformerConfig:
    """The transformer architecture of a run: --model (name or config.json) else --init's, then --feature-compression."""
    if cfg.model:
        if cfg.model in NAMED_CONFIGS:
            config = NAMED_CONFIGS[cfg.model]()
        elif Path(cfg.model).is_file():
            config = TransformerConfig.from_json(cfg.model)
        elif Path(cfg.model).is_dir():
            config = TransformerConfig.from_json(transformer_folder(cfg.model) / CONFIG_NAME)
        else:
            raise ConfigError(
                f"--model {cfg.model!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) nor a transformer config.json"
            )
    else:
        config = TransformerConfig.from_json(transformer_folder(cfg.init) / CONFIG_NAME)
    if cfg.feature_compression != "auto":
        on = cfg.feature_compression == "on"
        config = dataclasses.replace(config, downsample=on, upsample=on)
    return config.validate()


def load_init_weights(model: MeissonicTransformer, folder: str | Path) -> list[str]:
    """Load released-layout weights into `model`; returns the compression keys that start fresh.

    The only keys allowed to be missing are the feature compression layers, and only when `model`
    has them and the source was built without them (paper stage 3: 512 -> 1024).
    """
    tdir = transformer_folder(folder)
    source_config = TransformerConfig.from_json(tdir / CONFIG_NAME)
    state = load_state_dict_files(tdir)
    own = model.state_dict()
    fresh: list[str] = []
    if model.config.downsample and not source_config.downsample:
        fresh = [k for k in own if k.startswith(COMPRESSION_PREFIXES) and k not in state]
        state = {**state, **{k: own[k] for k in fresh}}
    check_state_dict(model, state, f"--init weights in {tdir}")
    model.load_state_dict(state, strict=True)
    return fresh


class MaskedImageModel(nn.Module):
    """What DDP/FSDP wrap: the transformer, plus the text encoder when it is trained and the LoRA adapters."""

    def __init__(self, transformer: MeissonicTransformer, text_encoder: nn.Module | None = None, lora: LoRA | None = None):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.lora = lora

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, micro: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, text: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is not None:
            text, pooled = self.text_encoder(token_ids)
        return self.transformer(tokens, text, pooled, timestep, img_ids, txt_ids, micro)


# ----------------------------------------------------------------------------------------------
# Optimisation


def parameter_groups(module: nn.Module, weight_decay: float, lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay only on matrices and kernels, never on norms, biases or embeddings."""
    embedding_params = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embedding_params and "embedding" not in name
        is_text = name.startswith("text_encoder.")
        groups.setdefault((is_text, decay), []).append(p)
    out = []
    for (is_text, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": (text_encoder_lr or lr) if is_text else lr})
    return out


class LRSchedule:
    """Multiplier of the peak LR at step s: linear warm-up, then constant or cosine to min_ratio."""

    def __init__(self, kind: str, warmup_steps: int, max_steps: int, min_ratio: float = 0.0):
        self.kind, self.warmup_steps, self.max_steps, self.min_ratio = kind, warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average (float32) of the trained parameters, keyed by parameter name."""

    def __init__(self, named: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, nn.Parameter]) -> None:
        shadow = list(self.shadow.values())
        torch._foreach_lerp_(shadow, [named[k].detach().float() for k in self.shadow], 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (gathers FSDP shards; collective, so every rank calls it)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], named: dict[str, nn.Parameter]) -> None:
        for k, v in self.shadow.items():
            full = state[k].to(torch.float32)
            p = named[k]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
            v.copy_(full)


# ----------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistEnv:
    """This process's place in the run (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend, device_id=dev if use_cuda else None)
        env.owns_group = True
    return env


# ----------------------------------------------------------------------------------------------
# Logging


class RunLog:
    """Rank 0's outputs: the progress line, train.log, metrics.jsonl and (optionally) TensorBoard.

    Other ranks get a silent instance, so calling code never checks the rank.
    """

    def __init__(self, out_dir: Path | None, *, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.out_dir = out_dir
        self.tensorboard = tensorboard and enabled
        self._metrics = None
        self._tb = None
        self._progress = None
        self._task = None
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not enabled)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'meissonic[tensorboard]'")

    def open(self, keep_through_step: int) -> None:
        """Start writing into the run directory; metrics after `keep_through_step` are dropped (a resumed run redoes them)."""
        if not self.enabled or self.out_dir is None:
            return
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
            write_text(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=keep_through_step + 1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self._progress.console if self._progress else self.console).print(text, markup=False, highlight=False)
        if self.out_dir is not None:
            with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def record(self, values: dict[str, Any]) -> None:
        if self._metrics is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def start_progress(self, start: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import TextColumn

        self._progress = make_progress(extra=[TextColumn("{task.fields[stats]}")], console=self.console)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")

    def progress(self, step: int, stats: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ----------------------------------------------------------------------------------------------
# Trainer


@dataclass
class StepStats:
    loss: float
    mask_rate: float
    grad_norm: float
    lr: float
    skipped: bool  # no weight update this step
    bad: bool  # counts towards --nan-patience


@dataclass
class TrainResult:
    """What a finished `train` run reports."""

    output: Path
    start_step: int
    steps: int
    losses: dict[int, float]  # step -> loss (mean over ranks and micro-steps)
    last_checkpoint: Path | None
    skipped_steps: int
    reloads: int
    seconds: float
    tokens_per_second: float


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `fit()` trains."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None):
        self.cfg = cfg.validate()
        self.env = env or init_distributed(cfg.device)
        self.device = self.env.device
        self.output = Path(cfg.output)
        self.log = RunLog(self.output, enabled=self.env.is_main, tensorboard=cfg.tensorboard)

        # ---- inputs, checked before anything is written
        self.shards = list_token_shards(cfg.data)
        if len(self.shards) < self.env.world_size:
            # Checked on every rank alike, so no rank goes ahead and waits for the others forever.
            raise InputError(
                f"{cfg.data} holds {len(self.shards)} complete token shard(s) for {self.env.world_size} processes; each "
                "process reads its own shards, so tokenize into at least as many shards or train on fewer processes"
            )
        self.info = read_dataset_info(cfg.data)
        self._check_dataset()
        self.model_config = resolve_model_config(cfg)
        codes = self.info.get("codebook_size")
        if codes is not None and int(codes) > self.model_config.codebook_size:
            raise InputError(
                f"{cfg.data}: the shards' VQ has {codes} codes but the model predicts {self.model_config.codebook_size}; "
                "tokenize with the model's VQ or pick a model whose codebook_size covers it"
            )
        self.resume_from = self._find_resume_checkpoint()
        self.base_root = self._base_model_root()
        if cfg.validate_every and self.base_root is None:
            raise ConfigError("--validate-every needs --base-model: a released-layout folder whose vqvae/ and scheduler/ decode the samples")
        self._check_text_features()

        # ---- model (identical on every rank: same seed before init)
        self._seed_everything(cfg.seed)
        with torch.device(self.device):  # initialising a 1B model on the GPU takes a fraction of the CPU time
            self.transformer = MeissonicTransformer(self.model_config)
        self.fresh_keys: list[str] = []
        if cfg.init and (self.resume_from is None or cfg.lora_rank):
            self.fresh_keys = load_init_weights(self.transformer, cfg.init)
        self.text_encoder = self._load_text_encoder() if self.online_text or self._needs_empty_prompt_encoder() else None
        self.lora: LoRA | None = None
        if cfg.lora_rank:
            self.transformer.requires_grad_(False)
            self.lora = LoRA(self.transformer, cfg.lora_rank, cfg.lora_alpha)
        self.transformer.to(self.device)
        self.transformer.gradient_checkpointing = cfg.gradient_checkpointing
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)
            if cfg.train_text_encoder:
                self.text_encoder.train().requires_grad_(True)
                self.text_encoder.set_grad_checkpointing(cfg.gradient_checkpointing)
            else:
                self.text_encoder.eval().requires_grad_(False)
        if self.lora is not None:
            self.lora.to(self.device)
        self.empty_text, self.empty_pooled = self._empty_prompt_features()

        self.module = MaskedImageModel(
            self.transformer, self.text_encoder if cfg.train_text_encoder else None, self.lora
        ).train()
        if cfg.compile:
            self.transformer.compile()
        self.wrapped = self._wrap(self.module)
        self.named_trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.module, cfg.weight_decay, cfg.lr, cfg.text_encoder_lr),
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            fused=self.device.type == "cuda" and not cfg.fsdp,
        )
        self.schedule = LRSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        ema_named = {n: p for n, p in self.named_trainable.items() if not n.startswith("text_encoder.")}
        self.ema = EMA(ema_named, cfg.ema_decay) if cfg.ema_decay > 0 else None

        # ---- per-rank randomness: masking, condition dropout
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.env.rank)
        self._seed_everything(cfg.seed * 100_003 + self.env.rank)
        self.grid = cfg.grid
        self.img_ids = image_ids(self.grid, self.grid, self.model_config, device=self.device)
        self.txt_ids = torch.zeros(self.context_length, 3, device=self.device)
        self.step = 0
        self.skipped_steps = 0
        self.reloads = 0
        self.consecutive_bad = 0
        self._reloads_of: dict[str, int] = {}
        my_shards = rank_shards(self.shards, self.env.rank, self.env.world_size)
        self.stream = ShardStream(my_shards, seed=cfg.seed, shuffle=cfg.shuffle)
        self.last_checkpoint: Path | None = None

    # ---- set-up helpers ------------------------------------------------------------------------

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _check_dataset(self) -> None:
        cfg, info = self.cfg, self.info
        grid = info.get("grid")
        if grid is not None and tuple(grid) != (cfg.grid, cfg.grid):
            raise InputError(
                f"{cfg.data}: shards hold {grid[0]}x{grid[1]} code grids (tokenized at {info.get('resolution')}px) but "
                f"--resolution {cfg.resolution} with --vq-factor {cfg.vq_factor} needs {cfg.grid}x{cfg.grid}; train with "
                f"--resolution {info.get('resolution')} or re-tokenize at {cfg.resolution}px"
            )
        factor = info.get("downsample_factor")
        if factor is not None and int(factor) != cfg.vq_factor:
            raise InputError(f"{cfg.data}: tokenized with a VQ factor of {factor}, but --vq-factor is {cfg.vq_factor}")

    @property
    def online_text(self) -> bool:
        """Captions are encoded during training (text encoder trained, or no stored text sequence)."""
        return self.cfg.train_text_encoder or self.info.get("text_features", "none") != "full"

    @property
    def context_length(self) -> int:
        return int(self.info.get("context_length", 77))

    def _needs_empty_prompt_encoder(self) -> bool:
        return self.cfg.cond_dropout > 0 and not self.online_text

    def _text_encoder_folder(self) -> Path | None:
        """--text-encoder, else the encoder tokenize used (dataset.json), else --init's text_encoder/."""
        if self.cfg.text_encoder:
            return Path(self.cfg.text_encoder)
        candidates = []
        used = (self.info.get("models") or {}).get("text_encoder")
        if used:
            candidates += [Path(used), Path(used) / "text_encoder"]
        if self.cfg.init:
            root = Path(self.cfg.init)
            candidates += [root / "text_encoder", root.parent / "text_encoder"]
        for cand in candidates:
            if (cand / "config.json").is_file():
                return cand
        return None

    def _check_text_features(self) -> None:
        cfg, info, mc = self.cfg, self.info, self.model_config
        if not self.online_text:
            if info.get("text_dim") not in (None, mc.joint_attention_dim) or info.get("pooled_dim") not in (None, mc.pooled_projection_dim):
                raise ConfigError(
                    f"{cfg.data}: stored text features are {info.get('text_dim')}-d (pooled {info.get('pooled_dim')}) but the "
                    f"model expects {mc.joint_attention_dim}-d (pooled {mc.pooled_projection_dim}); tokenize with the model's text encoder"
                )
        if (self.online_text or self._needs_empty_prompt_encoder()) and self._text_encoder_folder() is None:
            why = ("--train-text-encoder encodes captions online" if cfg.train_text_encoder
                   else f"the shards store no text sequence (text_features={info.get('text_features')!r})" if self.online_text
                   else "--cond-dropout needs the empty prompt's features")
            raise ConfigError(f"{why}: give --text-encoder (the encoder tokenize used), or an --init folder with text_encoder/"
                              + ("" if self.online_text else ", or set --cond-dropout 0"))

    def _load_text_encoder(self) -> nn.Module:
        from meissonic_cli.model.text_encoder import TextEncoder

        folder = self._text_encoder_folder()
        encoder = TextEncoder.from_pretrained(folder)
        mc = self.model_config
        if encoder.width != mc.joint_attention_dim or encoder.pooled_dim != mc.pooled_projection_dim:
            raise ConfigError(
                f"text encoder {folder} gives {encoder.width}-d sequences and {encoder.pooled_dim}-d pooled embeddings; the "
                f"model expects {mc.joint_attention_dim} and {mc.pooled_projection_dim}"
            )
        return encoder

    @torch.no_grad()
    def _empty_prompt_features(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._needs_empty_prompt_encoder():
            return None, None
        seq, pooled = self.text_encoder.encode([""])
        # Stored features are float16; round the replacement the same way.
        return seq.half().float().cpu(), pooled.half().float().cpu()

    def _base_model_root(self) -> Path | None:
        """Where the parts a checkpoint does not train come from (see --base-model)."""
        cfg = self.cfg
        if cfg.base_model:
            root = Path(cfg.base_model)
            if not (root / "vqvae" / "config.json").is_file():
                raise ConfigError(f"--base-model {root} has no vqvae/config.json; give a released-layout model folder")
            return root
        candidates = []
        if cfg.init:
            candidates += [Path(cfg.init), Path(cfg.init).parent]
        used = (self.info.get("models") or {}).get("vq")
        if used:
            candidates += [Path(used), Path(used).parent]
        return next((c for c in candidates if (c / "vqvae" / "config.json").is_file()), None)

    def _complete_model_folder(self, folder: Path) -> None:
        """Add the base model's untrained parts so `folder` is a whole released-layout model."""
        if self.base_root is None:
            return
        for part in BASE_MODEL_PARTS:
            src, dst = self.base_root / part, folder / part
            if dst.exists() or not src.exists():
                continue
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)

    def _find_resume_checkpoint(self) -> Path | None:
        cfg = self.cfg
        existing = ckpt.list_checkpoints(self.output)
        if not cfg.resume:
            if existing:
                raise OutputExistsError(
                    f"{self.output} already holds checkpoints (newest {existing[-1][1].name}); pass --resume auto to continue "
                    "that run or choose a new --output"
                )
            if self.output.is_dir() and (self.output / "metrics.jsonl").exists():
                raise OutputExistsError(f"{self.output} holds another run's metrics; pass --resume auto or choose a new --output")
            return None
        path = (existing[-1][1] if existing else None) if cfg.resume == "auto" else ckpt.check_checkpoint_dir(cfg.resume)
        if path is None:
            return None
        saved = TransformerConfig.from_json(path / "transformer" / CONFIG_NAME)
        if saved != self.model_config:
            diff = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(self.model_config, f.name)!r}"
                    for f in dataclasses.fields(TransformerConfig) if getattr(saved, f.name) != getattr(self.model_config, f.name)]
            raise ConfigError(
                f"cannot resume {path}: it was trained with a different model config ({'; '.join(diff)}); resume with the "
                "run's original --model/--init/--feature-compression or start a new --output"
            )
        saved_run = _read_saved_config(path)
        for name in ("lora_rank", "train_text_encoder"):
            if name in saved_run and saved_run[name] != getattr(cfg, name):
                raise ConfigError(
                    f"cannot resume {path}: it was trained with --{name.replace('_', '-')} {saved_run[name]!r}, this run has "
                    f"{getattr(cfg, name)!r}"
                )
        return path

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return module
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.cfg.precision == "bf16" else MixedPrecisionPolicy()
            for block in [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]:
                fully_shard(block, mp_policy=mp)
            if self.text_encoder is not None and self.cfg.train_text_encoder:
                for block in self.text_encoder.model.transformer.resblocks:
                    fully_shard(block, mp_policy=mp)
            fully_shard(module, mp_policy=mp)
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # ---- one step -----------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        samples = [next(self.stream) for _ in range(self.cfg.batch_size)]
        return collate(
            samples, grid=self.grid, codebook_size=self.model_config.codebook_size,
            use_stored_text=not self.online_text, score=None if self.cfg.score_micro_cond else self.cfg.default_score,
            source=str(self.cfg.data),
        )

    def micro_step_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, drop conditions, forward; returns (masked CE loss, mean masking rate)."""
        cfg, g, dev = self.cfg, self.generator, self.device
        b = batch.codes.shape[0]
        rates = sample_masking_rates(b, g, cfg.min_masking_rate)
        inputs, labels = mask_tokens(batch.codes, rates, self.model_config.mask_token_id, g)
        drop = torch.rand(b, generator=g) < cfg.cond_dropout
        kwargs: dict[str, Any] = {}
        if self.online_text:
            captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist())]
            token_ids = self.text_encoder.tokenize(captions).to(dev, non_blocking=True)
            if cfg.train_text_encoder:
                kwargs["token_ids"] = token_ids
            else:
                with torch.no_grad(), self._autocast():
                    text, pooled = self.text_encoder(token_ids)
                kwargs.update(text=text.float(), pooled=pooled.float())
        else:
            text, pooled = batch.text, batch.pooled
            if bool(drop.any()):
                text = torch.where(drop[:, None, None], self.empty_text, text)
                pooled = torch.where(drop[:, None], self.empty_pooled, pooled)
            kwargs.update(text=text.to(dev, non_blocking=True), pooled=pooled.to(dev, non_blocking=True))
        with self._autocast():
            logits = self.wrapped(
                inputs.to(dev, non_blocking=True), (rates * 1000).to(dev), batch.micro.to(dev, non_blocking=True),
                self.img_ids, self.txt_ids, **kwargs,
            )
        loss = masked_cross_entropy(logits, labels.to(dev, non_blocking=True))
        return loss, rates.mean()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        if self.cfg.fsdp and self.env.distributed:
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self) -> StepStats:
        """One optimizer step (grad_accum micro-steps); skipped when the loss or gradient is not finite."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        rate_sum = torch.zeros(())
        for i in range(cfg.grad_accum):
            batch = self.next_batch()
            last = i == cfg.grad_accum - 1
            with self._sync_context(last):
                loss, rate = self.micro_step_loss(batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
            rate_sum += rate
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = list(self.named_trainable.values())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        summary = torch.stack([loss_sum / cfg.grad_accum, grad_norm.detach().float().to(self.device),
                               (rate_sum / cfg.grad_accum).to(self.device)])
        summary = self.env.all_reduce_sum(summary) / self.env.world_size
        loss_v, norm_v, rate_v = (float(x) for x in summary.tolist())
        lr = self.optimizer.param_groups[0]["lr"]
        loss_ok, norm_ok = math.isfinite(loss_v), math.isfinite(norm_v)
        if self.scaler is not None:
            # Loss scaling overflows are routine: the scaler skips the update and lowers the scale.
            # Only a non-finite loss counts as a bad step.
            scale_before = self.scaler.get_scale()
            if loss_ok:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = not loss_ok or self.scaler.get_scale() < scale_before
            bad = not loss_ok
        else:
            bad = not (loss_ok and norm_ok)
            skipped = bad
            if not bad:
                self.optimizer.step()
        if not skipped and self.ema is not None:
            self.ema.update(self.named_trainable)
        with warnings.catch_warnings():
            # The LR is a pure function of the step, so stepping the schedule past a skipped update
            # (which torch warns about before the first optimizer step) loses nothing.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return StepStats(loss=loss_v, mask_rate=rate_v, grad_norm=norm_v, lr=lr, skipped=skipped, bad=bad)

    # ---- checkpoints ----------------------------------------------------------------------------

    @staticmethod
    def _state_dict_options(offload: bool = True) -> Any:
        """Whole (unsharded) tensors; `offload` gathers them to rank 0's CPU for writing."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=offload, strict=False)

    def save_checkpoint(self) -> Path:
        """Write step-NNNNNNNN/ (collective: every rank calls it, rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        cfg = self.cfg
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=self._state_dict_options())
        ema_state = self.ema.full_state() if self.ema is not None else None
        cursors = self.env.gather(self.stream.cursor_record())
        rngs = self.env.gather(ckpt.rng_state(self.generator))
        final = self.output / ckpt.checkpoint_name(self.step)
        if self.env.is_main:
            with ckpt.atomic_directory(final) as tmp:
                self._write_weights(tmp / "transformer", model_state)
                if ema_state is not None:
                    self._write_weights(tmp / "transformer_ema", {**model_state, **ema_state})
                if self.lora is not None:
                    save_lora(tmp / "lora" / "adapters.safetensors", self.lora, self.lora.named_adapters(model_state))
                    if ema_state is not None:
                        save_lora(tmp / "lora" / "adapters_ema.safetensors", self.lora, self.lora.named_adapters(ema_state))
                if cfg.train_text_encoder:
                    self._write_text_encoder(tmp / "text_encoder", model_state)
                # The schedule's shape comes from the current config (a resumed run may extend --max-steps),
                # so the saved state holds only the scheduler's counters.
                sched_state = {**self.scheduler.state_dict(), "lr_lambdas": [None] * len(self.optimizer.param_groups)}
                torch.save(
                    {"format": 1, "step": self.step, "optimizer": optim_state, "scheduler": sched_state,
                     "scaler": self.scaler.state_dict() if self.scaler else None, "world_size": self.env.world_size},
                    tmp / ckpt.TRAINER_STATE,
                )
                (tmp / "rng").mkdir()
                for rank, state in enumerate(rngs):
                    torch.save(state, tmp / "rng" / f"rank-{rank:05d}.pt")
                write_json(tmp / ckpt.DATA_CURSOR, {
                    "world_size": self.env.world_size,
                    "ranks": cursors,
                })
                (tmp / ckpt.CONFIG_FILE).write_text(cfg.to_yaml())
                self._complete_model_folder(tmp)
            removed = ckpt.prune_checkpoints(self.output, cfg.keep_last)
            self.log.message(f"saved {final}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))
        self.env.barrier()
        self.last_checkpoint = final
        return final

    def _transformer_state(self, module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The transformer's released-layout state out of a MaskedImageModel state (LoRA merged in)."""
        prefix = "transformer."
        state = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
        if self.lora is not None:
            state = merge_adapters(state, self.lora.named_adapters(module_state), self.lora.scale)
        return state

    def _write_weights(self, folder: Path, module_state: dict[str, torch.Tensor]) -> None:
        self._fresh_transformer(module_state).save_pretrained(folder)

    def _write_text_encoder(self, folder: Path, module_state: dict[str, torch.Tensor]) -> None:
        self._fresh_text_encoder(module_state).save_pretrained(folder)

    def load_checkpoint(self, path: Path, *, full: bool) -> None:
        """Restore weights, optimizer, schedule, scaler and EMA; with `full` also RNG, data cursor and step.

        A NaN-guard reload (`full=False`) keeps the current data position and random streams, so
        the run continues with fresh batches instead of replaying the ones that diverged.
        """
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = torch.load(path / ckpt.TRAINER_STATE, map_location="cpu", weights_only=True)
        model_state: dict[str, torch.Tensor] = {}
        if self.lora is not None:
            adapters = read_lora_file(path / "lora" / "adapters.safetensors")
            model_state.update(self.lora.module_keys(adapters, prefix="lora."))
        else:
            tdir = path / "transformer"
            model_state.update({f"transformer.{k}": v for k, v in load_state_dict_files(tdir).items()})
        if self.cfg.train_text_encoder:
            from meissonic_cli.model.text_encoder import TextEncoder

            te = TextEncoder.from_pretrained(path / "text_encoder")
            model_state.update({f"text_encoder.{k}": v for k, v in te.state_dict().items()})
        set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=state["optimizer"],
                       options=self._state_dict_options(offload=False))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if self.lora is not None:
                ema_full = self.lora.module_keys(read_lora_file(path / "lora" / "adapters_ema.safetensors"), prefix="lora.")
            else:
                ema_full = {f"transformer.{k}": v for k, v in load_state_dict_files(path / "transformer_ema").items()}
            self.ema.load_full_state(ema_full, self.named_trainable)
        self.step = int(state["step"])
        if full:
            rng_file = path / "rng" / f"rank-{self.env.rank:05d}.pt"
            if rng_file.is_file():
                # Our own file: it holds numpy/python RNG tuples, which the weights-only loader refuses.
                ckpt.restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), self.generator)
            cursors = json.loads((path / ckpt.DATA_CURSOR).read_text())
            if cursors["world_size"] == self.env.world_size:
                c = cursors["ranks"][self.env.rank]
                self.stream.cursor = DataCursor(epoch=c["epoch"], position=c["position"], offset=c["offset"])
            else:
                epoch = cursors["ranks"][0]["epoch"] + 1
                self.stream.cursor = DataCursor(epoch=epoch)
                self.log.message(
                    f"checkpoint written by {cursors['world_size']} processes, resuming on {self.env.world_size}: the data "
                    f"split changed, so reading restarts at epoch {epoch}"
                )
        self.last_checkpoint = path

    def _reload_after_divergence(self) -> None:
        latest = ckpt.latest_checkpoint(self.output)
        if latest is None:
            raise TrainingDivergedError(
                f"loss or gradient non-finite for {self.cfg.nan_patience} consecutive steps at step {self.step} before any "
                "checkpoint existed; lower --lr, use --precision bf16/fp32 or a smaller --max-grad-norm"
            )
        self._reloads_of[latest.name] = self._reloads_of.get(latest.name, 0) + 1
        if self._reloads_of[latest.name] > MAX_RELOADS_PER_CHECKPOINT:
            raise TrainingDivergedError(
                f"diverged again after reloading {latest} {MAX_RELOADS_PER_CHECKPOINT} times; lower --lr or inspect the data"
            )
        bad_at = self.step
        self.load_checkpoint(latest, full=False)
        self.reloads += 1
        self.consecutive_bad = 0
        self.log.message(
            f"non-finite loss/gradient for {self.cfg.nan_patience} consecutive steps (up to step {bad_at}): reloaded "
            f"{latest.name} and continuing from step {self.step} with the next batches"
        )

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, log = self.cfg, self.log
        if self.env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.output)
            write_text(self.output / ckpt.CONFIG_FILE, cfg.to_yaml())
        self.env.barrier()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from, full=True)
            log.message(f"resumed from {self.resume_from} at step {self.step}")
        elif cfg.resume == "auto":
            log.message(f"--resume auto: no checkpoint in {self.output}, starting at step 0")
        if self.fresh_keys:
            log.message(
                f"initialised from {cfg.init}; the feature compression layers start fresh ({len(self.fresh_keys)} tensors: "
                f"{', '.join(sorted({k.split('.')[0] for k in self.fresh_keys}))})"
            )
        elif cfg.init and self.resume_from is None:
            log.message(f"initialised from {cfg.init}")
        start = self.step
        log.open(keep_through_step=start)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.env.world_size * self.grid * self.grid
        n_params = sum(p.numel() for p in self.named_trainable.values())
        log.message(
            f"training {n_params:,} parameters on {self.env.world_size} x {self.device.type} "
            f"({'FSDP' if cfg.fsdp and self.env.distributed else 'DDP' if self.env.distributed else 'single process'}), "
            f"global batch {cfg.batch_size * cfg.grad_accum * self.env.world_size}, {self.grid}x{self.grid} tokens, "
            f"{len(self.shards)} shards, text features {'online' if self.online_text else 'stored'}"
        )
        losses: dict[int, float] = {}
        t_start = t_last = time.perf_counter()
        steps_since, window_losses = 0, []
        log.start_progress(start, cfg.max_steps)
        try:
            while self.step < cfg.max_steps:
                stats = self.train_step()
                self.step += 1
                steps_since += 1
                self.skipped_steps += int(stats.skipped)
                now = time.perf_counter()
                tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                log.record({"step": self.step, "loss": stats.loss, "mask_rate": stats.mask_rate, "lr": stats.lr,
                            "grad_norm": stats.grad_norm, "skipped": stats.skipped, "tokens_per_s": round(tps, 1)})
                if stats.bad:
                    self.consecutive_bad += 1
                    log.message(f"step {self.step}: non-finite loss or gradient, update skipped "
                                f"({self.consecutive_bad}/{cfg.nan_patience})")
                    if self.consecutive_bad >= cfg.nan_patience:
                        self._reload_after_divergence()
                        log.progress(self.step, "reloaded")
                        continue
                else:
                    self.consecutive_bad = 0
                    losses[self.step] = stats.loss
                    window_losses.append(stats.loss)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    mean_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                    log.progress(self.step, f"loss {mean_loss:.4f}  mask {stats.mask_rate:.2f}  lr {stats.lr:.2e}  {tps:,.0f} tok/s")
                    log.scalars(self.step, {"loss": mean_loss, "mask_rate": stats.mask_rate, "lr": stats.lr,
                                            "grad_norm": stats.grad_norm, "tokens_per_s": tps})
                    window_losses, steps_since, t_last = [], 0, time.perf_counter()
                if self.step == cfg.max_steps:
                    self.save_checkpoint()
                elif self.step % cfg.checkpoint_every == 0:
                    if self.consecutive_bad:
                        # Never let a reload target a state taken in the middle of a bad streak.
                        log.message(f"step {self.step}: checkpoint skipped during non-finite steps")
                    else:
                        self.save_checkpoint()
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    self.write_validation_samples()
        finally:
            log.close()
            self.stream.close()
        seconds = time.perf_counter() - t_start
        done = self.step - start
        result = TrainResult(
            output=self.output, start_step=start, steps=self.step, losses=losses, last_checkpoint=self.last_checkpoint,
            skipped_steps=self.skipped_steps, reloads=self.reloads, seconds=seconds,
            tokens_per_second=tokens_per_step * done / seconds if done and seconds > 0 else 0.0,
        )
        if self.env.is_main:
            _print_summary(log.console, result)
        return result

    def write_validation_samples(self) -> Path | None:
        """Sample --validation-prompt images into <output>/samples/step-NNNNNNNN.png (collective; rank 0 samples).

        Sampling runs on a fresh copy of the current weights (the EMA weights when --ema-decay is set,
        LoRA merged), so the training modules, hooks and wrappers are left untouched.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        cfg = self.cfg
        model_state = get_model_state_dict(self.module, options=self._state_dict_options())
        if self.ema is not None:
            model_state = {**model_state, **self.ema.full_state()}
        path = None
        if self.env.is_main:
            from meissonic_cli.sample.pipeline import MeissonicPipeline
            from meissonic_cli.sample.sample import make_grid

            scheduler, vq, frozen_text = self._validation_parts()
            transformer = self._fresh_transformer(model_state).to(self.device).eval()
            text_encoder = self._fresh_text_encoder(model_state).to(self.device).eval() if cfg.train_text_encoder else frozen_text
            pipe = MeissonicPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, vq=vq)
            images = pipe(list(cfg.validation_prompts), steps=cfg.validation_steps, guidance_scale=cfg.validation_cfg,
                          height=cfg.resolution, width=cfg.resolution, seed=cfg.seed)
            grid = make_grid(images, list(cfg.validation_prompts))
            path = self.output / "samples" / f"{ckpt.checkpoint_name(self.step)}.png"
            atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
            self.log.message(f"validation samples ({'EMA' if self.ema is not None else 'current'} weights): {path}")
            del pipe, transformer
        self.env.barrier()
        return path

    def _validation_parts(self) -> tuple[Any, Any, Any]:
        """Scheduler, VQ and frozen text encoder for validation sampling, loaded once."""
        if getattr(self, "_val_parts", None) is None:
            from meissonic_cli.model.scheduler import MaskGITScheduler
            from meissonic_cli.model.text_encoder import TextEncoder
            from meissonic_cli.model.vq import load_vq

            root = self.base_root
            scheduler = MaskGITScheduler.from_config_dir(root / "scheduler")
            vq = load_vq(root / "vqvae", dtype=torch.float32).to(self.device).eval()
            text = None
            if not self.cfg.train_text_encoder:
                if self.text_encoder is not None:
                    text = self.text_encoder
                else:
                    text = TextEncoder.from_pretrained(self._text_encoder_folder() or root / "text_encoder").to(self.device).eval()
            self._val_parts = (scheduler, vq, text)
        return self._val_parts

    def _fresh_transformer(self, module_state: dict[str, torch.Tensor]) -> MeissonicTransformer:
        state = self._transformer_state(module_state)
        model = build_on_meta(self.model_config)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def _fresh_text_encoder(self, module_state: dict[str, torch.Tensor]) -> nn.Module:
        from meissonic_cli.model.text_encoder import TextEncoder

        prefix = "text_encoder."
        state = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
        encoder = TextEncoder(self.text_encoder.config, self.text_encoder.tokenizer)
        encoder.load_state_dict(state, strict=True)
        return encoder


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    # Hard links cost no space; across file systems fall back to a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _read_saved_config(path: Path) -> dict[str, Any]:
    import yaml

    file = path / ckpt.CONFIG_FILE
    return (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}


def _print_summary(console: Any, result: TrainResult) -> None:
    from rich.table import Table

    table = Table(title="meissonic train", show_header=False)
    last = [v for k, v in sorted(result.losses.items())][-10:]
    table.add_row("steps", f"{result.start_step} -> {result.steps}")
    table.add_row("final loss (mean of last 10)", f"{sum(last) / len(last):.4f}" if last else "-")
    table.add_row("tokens/s", f"{result.tokens_per_second:,.0f}")
    table.add_row("skipped steps / reloads", f"{result.skipped_steps} / {result.reloads}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("last checkpoint", str(result.last_checkpoint or "-"))
    console.print(table)


def train(cfg: TrainConfig) -> TrainResult:
    """Run `meissonic train`: one process, or one rank under torchrun."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return Trainer(cfg, env).fit()
    finally:
        env.close()
