"""The ``pretrain.<method>.train`` settings: what the shared trainer reads, with DINO's defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    epochs: int = 100                   # DINO --epochs
    # images per optimiser step over every GPU and micro-batch (the paper's effective batch); null = this many
    # per GPU × GPUs, the official launchers' rule. Set, any GPU count that divides it keeps it, with gradient
    # accumulation where one step does not fit batch_size_per_gpu (densessl.launch.batch_rule)
    batch_size: int | None = None
    batch_size_per_gpu: int = 64        # DINO --batch_size_per_gpu; with batch_size set: the largest per GPU
    lr: float = 0.0005                  # DINO --lr, at total batch 256 (linear scaling)
    min_lr: float = 1e-6                # DINO --min_lr
    warmup_epochs: float = 10           # DINO --warmup_epochs
    weight_decay: float = 0.04          # DINO --weight_decay
    weight_decay_end: float = 0.4       # DINO --weight_decay_end
    momentum_teacher: float = 0.996     # DINO --momentum_teacher (cosine → 1)
    clip_grad: float = 3.0              # DINO --clip_grad (per parameter; 0 disables)
    # how clip_grad is applied: "per_parameter" (DINO utils.clip_gradients; SelfPatch and GTSA inherit it) or
    # "global_norm" over all student gradients together (LOCA: jax.example_libraries.optimizers.clip_grads,
    # max_grad_norm 1.0 in google-research/scenic @ 4a38d47 projects/loca/configs/loca_imnet1k_base16.py)
    clip_mode: str = "per_parameter"
    # adamw | sgd | lars; null = the method's ``optimizer_name`` (CLoVE: lars), else adamw (DINO --optimizer)
    optimizer: str | None = None
    precision: str = "bf16"             # bf16 autocast on CUDA; CPU always runs fp32
    # channels-last weights and images for convolutional backbones (not in the official code; the same
    # arithmetic in another memory layout, tests/test_clove.py). CLoVE ResNet-50 on an H100, bf16, batch 64:
    # 376 vs 360 img/s in two separate runs of benchmarks/train_step.py, within their run-to-run spread (the
    # plain loop read 294 and 341), so off until an interleaved measurement shows a gain.
    channels_last: bool = False
    seed: int = 0                       # DINO --seed
    num_workers: int = 10               # DINO --num_workers
    # where the views are made: "cpu" (PIL in the DataLoader workers, the reference) or "device" (the workers
    # read JPEG bytes; the training process decodes them with torchvision.io.decode_jpeg and makes the
    # multi-crop views with kornia on the training device; DINO, SelfPatch and CLoVE; docs/performance.md)
    data_path: str = "cpu"
    checkpoint_every_steps: int = 1000  # plus one at every epoch end
    log_every_steps: int = 10
    max_train_images: int | None = None  # use the first N images (smoke runs)
    tensorboard: bool = True            # scalars of every logged metric in <out_dir>/tensorboard (rank 0)
    warmup_start_factor: float = 0.0    # warm-up starts at peak lr × this (DINO 0; CLoVE 0.01, --warmup-multiplier 100)
    min_lr_factor: float | None = None  # set: final lr = peak lr × this, overriding min_lr (CLoVE 0.01, main_pretrain.py)
    # processes (GPUs) per node, read by densessl.train.launch; null = one per GPU of the job
    # (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES), 1 without GPU. On SLURM the job asks for nodes × this many GPUs
    # (densessl.launch.resources); a distributed run records the layout it ran on here
    nproc_per_node: int | None = None
    nodes: int = 1
    # --- how the step is computed, not what (docs/performance.md, "Step settings"); none of these is part of a
    # run's resume identity (checkpointing.RESUME_NEUTRAL_FIELDS): they change rounding at most ---
    # torch.compile of the method's loss (student and teacher forward, loss); off: a choice to measure on the GPU
    # (benchmarks/train_step.py --compile), the first steps pay the compilation
    compile: bool = False
    # torch.optim.AdamW(fused=True) on CUDA (one kernel for every parameter's update); ignored on CPU and for
    # sgd/lars
    fused_adamw: bool = True
    # steps between reads of the device-side record of the first non-finite loss (and, on several processes,
    # between the all-reduces that agree on it and on a stop signal); it is also read before every checkpoint,
    # so a NaN at step k never lets a checkpoint after k be written. 1 = the official per-step check
    finite_check_every: int = 10
