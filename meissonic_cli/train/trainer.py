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
own shards and only rank 0 logs and writes. This module is the recipe (set-up and loop); the
building blocks live beside it:

    objective.py     masking rates, token masking, condition dropout, masked cross-entropy, batches
    optim.py         AdamW parameter groups and the LR schedule
    ema.py           the EMA of the trained weights
    distributed.py   DistEnv, init_distributed, DDP/FSDP wrapping
    runlog.py        progress line, train.log, metrics.jsonl, tracker (rank 0 only)
    curves.py        masked-token accuracy and mask-rate bucket losses per window, curves.png
    validation.py    validation image grids
    checkpoint.py    checkpoint directories: write, find, prune, read back (no pickle)
    ../data/shards.py  ShardStream, the resumable token shard reader
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meissonic_cli.atomic import write_text
from meissonic_cli.data.shards import DataCursor, ShardStream, list_token_shards, rank_shards, read_dataset_info
from meissonic_cli.errors import ConfigError, InputError, MeissonicError
from meissonic_cli.model.lora import LoRA
from meissonic_cli.model.transformer import MeissonicTransformer, image_ids
from meissonic_cli.safety import derive_seed
from meissonic_cli.train import checkpoint as ckpt
from meissonic_cli.train.config import TrainConfig
from meissonic_cli.train.curves import MetricsWindow
from meissonic_cli.train.distributed import DistEnv, full_state_options, gradient_sync, init_distributed, wrap_model
from meissonic_cli.train.ema import EMA
from meissonic_cli.train.masked_model import (
    MaskedImageModel,
    base_model_root,
    load_init_weights,
    resolve_init,
    resolve_model_config,
    text_encoder_folder,
)
from meissonic_cli.train.objective import (
    Batch,
    collate,
    draw_condition_dropout,
    drop_captions,
    drop_features,
    mask_tokens,
    masked_cross_entropy,
    masked_token_stats,
    sample_masking_rates,
)
from meissonic_cli.train.optim import build_optimizer, scheduler_state
from meissonic_cli.train.runlog import RunLog, StepStats, TrainResult, print_summary

# A reload that lands on the same checkpoint this many times in a row means the run cannot recover.
MAX_RELOADS_PER_CHECKPOINT = 3


class TrainingDivergedError(MeissonicError):
    """The loss stayed non-finite and reloading checkpoints did not help."""


# ----------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `fit()` trains."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None):
        self.cfg = cfg = resolve_init(cfg.validate())
        self.env = env or init_distributed(cfg.device)
        self.device = self.env.device
        self.output = Path(cfg.output)
        self.log = RunLog(self.output, enabled=self.env.is_main, tensorboard=cfg.tensorboard, report_to=cfg.report_to,
                          wandb_project=cfg.wandb_project, curves=cfg.curves)

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
        self.resume_from = ckpt.find_resume_checkpoint(self.output, cfg, self.model_config)
        self.base_root = base_model_root(self.cfg, self.info)
        if cfg.validate_every and self.base_root is None:
            raise ConfigError("--validate-every needs --base-model: a released-layout folder whose vqvae/ and scheduler/ decode the samples")
        self._check_text_features()

        # ---- model (identical on every rank: same seed before init)
        self._seed_everything(cfg.seed)
        with torch.device(self.device):  # initialising a 1B model on the GPU takes a fraction of the CPU time
            self.transformer = MeissonicTransformer(self.model_config)
        self.fresh_keys: list[str] = []
        if cfg.init and (self.resume_from is None or cfg.lora_rank):
            self.fresh_keys = load_init_weights(self.transformer, cfg.init, cfg.variant or None)
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
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        if self.text_encoder is not None and cfg.train_text_encoder:
            blocks += list(self.text_encoder.model.transformer.resblocks)
        self.wrapped = wrap_model(self.module, self.env, fsdp=cfg.fsdp, precision=cfg.precision, blocks=blocks)
        self.named_trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.optimizer, self.scheduler = build_optimizer(self.module, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        ema_named = {n: p for n, p in self.named_trainable.items() if not n.startswith("text_encoder.")}
        self.ema = EMA.for_config(ema_named, cfg) if cfg.ema_decay > 0 else None

        # ---- per-rank randomness: masking, condition dropout
        rank_seed = derive_seed(cfg.seed * 100_003, self.env.rank)  # in the one seed range for every --seed
        self.generator = torch.Generator().manual_seed(rank_seed)
        self._seed_everything(rank_seed)
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
        self._validator: Any = None

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
        return text_encoder_folder(self.cfg, self.info)

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
        drop = draw_condition_dropout(b, cfg.cond_dropout, g)
        kwargs: dict[str, Any] = {}
        if self.online_text:
            captions = drop_captions(batch.captions, drop)
            token_ids = self.text_encoder.tokenize(captions).to(dev, non_blocking=True)
            if cfg.train_text_encoder:
                kwargs["token_ids"] = token_ids
            else:
                with torch.no_grad(), self._autocast():
                    text, pooled = self.text_encoder(token_ids)
                kwargs.update(text=text.float(), pooled=pooled.float())
        else:
            text, pooled = drop_features(batch.text, batch.pooled, drop, self.empty_text, self.empty_pooled)
            kwargs.update(text=text.to(dev, non_blocking=True), pooled=pooled.to(dev, non_blocking=True))
        with self._autocast():
            logits = self.wrapped(
                inputs.to(dev, non_blocking=True), (rates * 1000).to(dev), batch.micro.to(dev, non_blocking=True),
                self.img_ids, self.txt_ids, **kwargs,
            )
        loss = masked_cross_entropy(logits, labels := labels.to(dev, non_blocking=True))
        self.last_token_stats = masked_token_stats(logits, labels)  # for the curves only: no grad, no randomness
        return loss, rates.mean()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return gradient_sync(self.wrapped, fsdp=self.cfg.fsdp and self.env.distributed, last=last)

    def train_step(self) -> StepStats:
        """One optimizer step (grad_accum micro-steps); skipped when the loss or gradient is not finite."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        rate_sum = torch.zeros(())
        token_stats: Any = 0  # masked_token_stats summed over the micro-steps
        for i in range(cfg.grad_accum):
            batch = self.next_batch()
            last = i == cfg.grad_accum - 1
            with self._sync_context(last):
                loss, rate = self.micro_step_loss(batch)
                token_stats = token_stats + self.last_token_stats
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
        token_stats = self.env.all_reduce_sum(token_stats).tolist()
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
        return StepStats(loss=loss_v, mask_rate=rate_v, grad_norm=norm_v, lr=lr, skipped=skipped, bad=bad,
                         token_stats=token_stats)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write step-NNNNNNNN/ (collective: every rank calls it, rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=full_state_options())
        ema_state = self.ema.full_state() if self.ema is not None else None
        cursors = self.env.gather(self.stream.cursor_record())
        rngs = self.env.gather(ckpt.rng_state(self.generator))
        final = self.output / ckpt.checkpoint_name(self.step)
        if self.env.is_main:
            ckpt.write_checkpoint(
                final, step=self.step, model_state=model_state, optim_state=optim_state, ema_state=ema_state,
                scheduler_state=scheduler_state(self.scheduler), scaler_state=self.scaler.state_dict() if self.scaler else None,
                rngs=rngs, cursors=cursors, config_yaml=self.cfg.to_yaml(), model_config=self.model_config, lora=self.lora,
                text_encoder=self.text_encoder if self.cfg.train_text_encoder else None, base_root=self.base_root,
                merged=self.lora is None or self.cfg.save_merged,
                extra_state={"ema_schedule": self.ema.schedule_state() if self.ema else None, "wandb_run_id": self.log.run_id},
            )
            removed = ckpt.prune_checkpoints(self.output, self.cfg.keep_last)
            self.log.message(f"saved {final}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))
            self.log.draw_curves()
        self.env.barrier()
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, path: Path, *, full: bool) -> None:
        """Restore weights, optimizer, schedule, scaler and EMA; with `full` also RNG, data cursor and step.

        A NaN-guard reload (`full=False`) keeps the current data position and random streams, so
        the run continues with fresh batches instead of replaying the ones that diverged. Nothing
        is unpickled: weights are safetensors, the trainer state goes through the weights-only
        loader, RNG state is safetensors + JSON and the data cursor JSON.
        """
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = ckpt.read_trainer_state(path)
        # Read every part before changing anything, so a damaged checkpoint leaves the trainer as it was.
        rng = ckpt.read_rng_state(path, self.env.rank) if full else None
        cursors = ckpt.read_data_cursors(path) if full else None
        model_state = ckpt.read_module_state(path, lora=self.lora, text_encoder=self.cfg.train_text_encoder)
        set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=state["optimizer"],
                       options=full_state_options(offload=False))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_full_state(ckpt.read_ema_state(path, lora=self.lora), self.named_trainable)
            self.ema.resume_schedule(state.get("ema_schedule"), int(state["step"]), self.cfg, say=self.log.message)
        self.step = int(state["step"])
        self.log.run_id = state.get("wandb_run_id") or self.log.run_id
        if full:
            if rng is not None:
                ckpt.restore_rng_state(rng, self.generator, str(ckpt.rng_file(path, self.env.rank)))
            else:
                self.log.message(f"{path} holds no random-number state for rank {self.env.rank}: random streams start afresh")
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
        if self.resume_from is not None:
            # Read the checkpoint before writing anything: a damaged or hostile one leaves the run as it was.
            self.load_checkpoint(self.resume_from, full=True)
        if self.env.is_main:
            ckpt.remove_stale_temporaries(self.output)
            write_text(self.output / ckpt.CONFIG_FILE, cfg.to_yaml())
        self.env.barrier()
        if self.resume_from is not None:
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
        log.open(keep_through_step=start, config=cfg.to_dict())
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
        steps_since, window = 0, MetricsWindow()
        log.start_progress(start, cfg.max_steps)
        try:
            while self.step < cfg.max_steps:
                stats = self.train_step()
                self.step += 1
                steps_since += 1
                self.skipped_steps += int(stats.skipped)
                now = time.perf_counter()
                tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                row_extra, summary = window.step(stats.loss, stats.token_stats, bad=stats.bad, close=log_now)
                log.record({"step": self.step, "loss": stats.loss, "mask_rate": stats.mask_rate, "lr": stats.lr,
                            "grad_norm": stats.grad_norm, "skipped": stats.skipped, "tokens_per_s": round(tps, 1), **row_extra})
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
                if log_now:
                    log.progress(self.step, f"loss {summary['loss']:.4f}  mask {stats.mask_rate:.2f}  lr {stats.lr:.2e}  {tps:,.0f} tok/s")
                    log.scalars(self.step, {**summary, "mask_rate": stats.mask_rate, "lr": stats.lr,
                                            "grad_norm": stats.grad_norm, "tokens_per_s": tps})
                    steps_since, t_last = 0, time.perf_counter()
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
            print_summary(log.console, result)
        return result

    def write_validation_samples(self) -> Path | None:
        """Sample --validation-prompt images into <output>/samples/step-NNNNNNNN.png (collective; rank 0 samples).

        Sampling runs on a fresh copy of the current weights (the EMA weights when --ema-decay is set,
        LoRA merged), so the training modules, hooks and wrappers are left untouched.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_state = get_model_state_dict(self.module, options=full_state_options())
        if self.ema is not None:
            model_state = {**model_state, **self.ema.full_state()}
        path = None
        if self.env.is_main:
            if self._validator is None:
                from meissonic_cli.train.validation import ValidationSampler

                self._validator = ValidationSampler(self.cfg, base_root=self.base_root, device=self.device,
                                                    text_encoder_folder=self._text_encoder_folder(),
                                                    frozen_text_encoder=self.text_encoder)
            transformer = ckpt.fresh_transformer(self.model_config, model_state, self.lora)
            trained_text = ckpt.fresh_text_encoder(self.text_encoder, model_state) if self.cfg.train_text_encoder else None
            path = self._validator.write_grid(self.output / "samples" / f"{ckpt.checkpoint_name(self.step)}.png",
                                              transformer, trained_text)
            self.log.message(f"validation samples ({'EMA' if self.ema is not None else 'current'} weights): {path}")
            self.log.image(self.step, "samples", path, caption=" | ".join(self.cfg.validation_prompts))
            del transformer, trained_text
        self.env.barrier()
        return path


def train(cfg: TrainConfig, trainer: type[Trainer] = Trainer) -> TrainResult:
    """Run `meissonic train` (or, with `trainer=DistillTrainer`, `distill`): one process, or one rank under torchrun."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return trainer(cfg, env).fit()
    finally:
        env.close()
