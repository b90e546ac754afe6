"""Cluster scale-out: how a pretraining run is laid over GPUs and nodes, how long its jobs ask for, and how it is
submitted without Snakemake.

* ``batch_rule``: the GPU-count rule (effective batch, per-GPU batch, gradient accumulation, learning rate) — pure,
  no torch, so ``snakemake -n`` and the refusal messages cost nothing.
* ``time_plan``: per-job time limits from measured throughput, split into segments at the partition's limit.
* ``slurm_site``: partition, account, QoS and node size from config.yaml's ``slurm:`` block or the environment.
* ``resources``: the Snakemake resources of one pretraining job (GPUs, nodes, tasks, time limit, signal).
* ``srun``: inside a SLURM allocation, one task per GPU over every node, with the rendezvous from the allocation.
* ``submitit_launch``: ``python -m densessl launch``, the same run submitted through submitit, requeued on
  preemption or at the time limit through submitit's checkpointing.
"""
