"""`python -m densessl <stage>`: the single entry point that Snakemake rules and DVC stages both call.

Stages: data, pretrain, convert, evaluate, report; plus `launch` (one pretraining run through submitit), `export` (a backbone in a toolkit's layout), `doctor` (checks the environment),
`plan` / `status` (what the papers' tables need, and how far a results folder is),
`synthesize` (write a synthetic dataset anywhere, outside the DAG), `download` (fetch, verify, extract and
prepare a real dataset) and `datasets` (the dataset catalog and what is present under the configured roots).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from densessl import cputime
from densessl.errors import DenseSSLError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="config file(s), merged in order onto the preset (default: config.yaml)")
    p.add_argument("--preset", choices=["smoke", "paper"], default=None, help="override config.yaml's preset")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: config 'threads')")


def _add_planning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="config file(s), merged in order onto the preset (default: config.yaml when present)")
    p.add_argument("--preset", choices=["smoke", "paper"], default=None, help="override config.yaml's preset")
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/report.md)")


def _planning(args: argparse.Namespace) -> int:
    """plan / status: torch-free (the configuration without the per-stage settings check), a second or so."""
    import json

    from densessl.config import load_config

    files = args.config or (["config.yaml"] if Path("config.yaml").is_file() else [])
    cfg = load_config(files, preset=args.preset, check_settings=False)
    if args.stage == "plan":
        from densessl.report.plan import build_plan, format_plan

        result = build_plan(cfg)
        print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
        return 0
    from densessl.report.status import build_status, format_status

    status = build_status(cfg, args.results)
    print(json.dumps(status.as_dict(), indent=2) if args.json else format_status(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densessl", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("data", help="prepare one dataset (synthesise at smoke scale) and write its manifest")
    _add_common(p)
    p.add_argument("--dataset", required=True)

    p = sub.add_parser("synthesize", help="write a synthetic dataset in a real layout to any folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", default="smoke", choices=["tiny", "smoke"])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("download", help="download (or verify manually placed files), extract and prepare one real "
                                        "dataset; reruns continue where they stopped")
    p.add_argument("--dataset", required=True, help="a name from `densessl datasets`")
    p.add_argument("--root", required=True, type=Path, help="the dataset root to fill (data.roots.<dataset>)")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="scheme://host[/prefix] that serves the official paths (same checksums)")
    p.add_argument("--downloads", type=Path, default=None,
                   help="folder for the archives (default <root>/.densessl-downloads)")
    p.add_argument("--catalog", type=Path, default=None, help="a YAML laid over the built-in catalog")
    p.add_argument("--coco-root", type=Path, default=None,
                   help="lvis only: a prepared COCO root; its images/{train2017,val2017} are linked into the LVIS root")
    p.add_argument("--retries", type=int, default=5, help="retries in a row per file (default 5)")
    p.add_argument("--log-interval", type=float, default=None,
                   help="seconds between progress lines (default: $DENSESSL_PROGRESS_INTERVAL, else 30)")

    p = sub.add_parser("datasets", help="list every dataset: files, sizes, checksums, manual or not, and what is "
                                        "present and verified under the configured roots")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="config file(s) whose data.roots are inspected (default: config.yaml when present)")
    p.add_argument("--preset", choices=["smoke", "paper"], default=None)
    p.add_argument("--catalog", type=Path, default=None, help="a YAML laid over the built-in catalog")
    p.add_argument("--json", action="store_true", help="print JSON (a list of datasets) instead of a table")

    p = sub.add_parser("pretrain", help="pretrain one run (resumes from its checkpoint if present)")
    _add_common(p)
    p.add_argument("--run", required=True, help="run id, e.g. dino/vit-tiny-p8-imagenet")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume-anyway", dest="resume", action="store_const", const="anyway",
                        help="continue a checkpoint written with other settings, under the new settings")
    resume.add_argument("--restart", dest="resume", action="store_const", const="restart",
                        help="delete the run's checkpoints and metrics and train from step 0")
    p.set_defaults(resume=None)

    p = sub.add_parser("launch", help="submit one pretraining run to SLURM through submitit (no Snakemake); "
                                      "requeued on preemption and at its time limit, resuming from its checkpoint")
    _add_common(p)
    p.add_argument("--run", required=True, help="run id, e.g. dino/vit-s16-imagenet")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: pretrain.<method>.train.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (tasks) per node (default: train.nproc_per_node, spread by slurm.gpus_per_node)")
    p.add_argument("--partition", default=None, help="default: slurm.partition / DENSESSL_SLURM_PARTITION")
    p.add_argument("--account", default=None, help="default: slurm.account / DENSESSL_SLURM_ACCOUNT")
    p.add_argument("--qos", default=None, help="default: slurm.qos / DENSESSL_SLURM_QOS")
    p.add_argument("--cpus-per-gpu", type=int, default=None, help="default: slurm.cpus_per_gpu")
    p.add_argument("--mem-mb-per-gpu", type=int, default=None, help="default: slurm.mem_mb_per_gpu")
    p.add_argument("--time", type=int, default=None, metavar="MINUTES",
                   help="each job's time limit (default: the compute plan's)")
    p.add_argument("--wait", action="store_true", help="wait until the run has finished, requeues included")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the sbatch parameters only")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume-anyway", dest="resume", action="store_const", const="anyway")
    resume.add_argument("--restart", dest="resume", action="store_const", const="restart")
    p.set_defaults(resume=None)

    p = sub.add_parser("convert", help="export a run's backbone (teacher weights) or a random init")
    _add_common(p)
    p.add_argument("--run", required=True)

    p = sub.add_parser("export", help="write a run's exported backbone in a toolkit's layout (detectron2 .pkl)")
    _add_common(p)
    p.add_argument("--format", required=True, help="detectron2")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("evaluate", help="run one evaluation protocol on one backbone")
    _add_common(p)
    p.add_argument("protocol")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a run of the configuration (what the DAG evaluates)")
    which.add_argument("--timm-model", metavar="NAME",
                       help="any timm model by name instead (e.g. vit_small_patch16_224.dino); needs --out")
    p.add_argument("--pretrained", action="store_true", help="with --timm-model: load timm's released weights")
    p.add_argument("--out", type=Path, default=None, help="with --timm-model: where to write metrics.json")
    p.add_argument("--img-size", type=int, default=None,
                   help="with --timm-model: input size for timm.create_model (the benchmark builds dinov2 at 224)")
    p.add_argument("--device", default=None)

    p = sub.add_parser("report", help="build the report tables from every metrics.json")
    _add_common(p)

    p = sub.add_parser("check-report", help="fail unless the report's supervised reference beats the best "
                                             "random-init seed of its network on every protocol")
    _add_common(p)

    p = sub.add_parser("targets", help="print the files `snakemake` would build (one per line)")
    _add_common(p)

    p = sub.add_parser("dvc-yaml", help="print dvc.yaml for the configuration (same stages as the Snakefile)")
    _add_common(p)

    p = sub.add_parser("feature-stats", help="effective rank, colour and position shares of every exported "
                                              "backbone's patch tokens (diagnostics, printed)")
    _add_common(p)
    p.add_argument("--images", type=int, default=128, help="validation images to use (default 128)")
    p.add_argument("--protocol", default="patchseg_coco", help="whose data: patchseg_coco | patchseg_ade20k")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("plan", help="per paper table: the jobs it needs, GPU-hours (named figures), disk and the "
                                    "published numbers matched or explained, before anything runs")
    _add_planning(p)

    p = sub.add_parser("status", help="per paper table and protocol: cells done, running, pending, failed, and an "
                                      "ETA from the logged progress")
    _add_planning(p)
    p.add_argument("--results", type=Path, default=None,
                   help="the results folder to read (default: the configuration's results/<preset>)")

    sub.add_parser("doctor", help="check that torch's, torchvision's and mmcv's compiled ops work")
    return parser


# stages that neither train nor evaluate: their jobs skip importing torch
TORCH_FREE_STAGES = frozenset({"data", "report", "check-report", "dvc-yaml", "targets"})


def _config(args: argparse.Namespace):  # noqa: ANN202
    from densessl.config import load_config

    # Every run's and protocol's settings are checked where a whole DAG is planned (the Snakefile, dvc-yaml,
    # targets); a single stage builds and checks only its own settings, and skips importing every protocol.
    cfg = load_config(args.config or ["config.yaml"], preset=args.preset,
                      check_settings=args.stage in ("dvc-yaml", "targets"))
    threads = args.threads or cfg.threads
    if args.stage in TORCH_FREE_STAGES and "torch" not in sys.modules:
        # torch costs 1.5 CPU s to import; these stages do not need it. Should a library they call import it,
        # it (and numpy's BLAS) still starts with the configured threads.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    else:
        import torch

        torch.set_num_threads(threads)
    cputime.mark("startup")  # interpreter, the stage's imports and the configuration: what every job pays
    return cfg


def _resume_mode(flag: str | None) -> str:
    """--resume-anyway / --restart, else $DENSESSL_RESUME (how a Snakemake-run stage is told), else "auto"."""
    from densessl.train.checkpointing import RESUME_ENV, RESUME_MODES

    mode = flag or os.environ.get(RESUME_ENV) or "auto"
    if mode not in RESUME_MODES:
        raise DenseSSLError(f"{RESUME_ENV}={mode!r}: allowed values: {', '.join(RESUME_MODES)}")
    return mode


def _lock(directory: Path, what: str = "run"):  # noqa: ANN202
    from densessl.runlock import run_lock

    return run_lock(directory, what)


def doctor() -> None:
    import torch
    import torchvision
    from torchvision.ops import nms, roi_align

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2], keep
    pooled = roi_align(torch.ones(1, 1, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=2)
    assert pooled.shape == (1, 1, 2, 2)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: nms and roi_align OK "
          f"(CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available, CPU'})")
    from densessl.evaluate.transfer.mmengine_run import check_mmcv_ops

    print(check_mmcv_ops())  # the mmseg/mmdet protocols: a broken mmcv build fails here, with the fix


def _print_datasets(args: argparse.Namespace) -> None:
    import json

    from densessl.data.acquire import format_status, status
    from densessl.data.catalog import load_catalog

    roots: dict = {}
    if args.config or Path("config.yaml").is_file():
        from densessl.config import load_config

        cfg = load_config(args.config or ["config.yaml"], preset=args.preset)
        roots = dict((cfg.data.get("data", {}) or {}).get("roots") or {})
    rows = status(load_catalog(args.catalog), roots)
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
def _pretrain(args: argparse.Namespace, argv: list[str] | None) -> int:
    """One process per GPU: srun tasks inside a SLURM allocation (any number of nodes), torchrun on one node
    elsewhere, in-process for one. The launcher holds the run's lock; its tasks or workers run under it."""
    from densessl.launch.resources import run_layout
    from densessl.launch.srun import adopt_task_env, in_allocation, launch_tasks
    from densessl.stages.pretrain import pretrain_nproc, run_pretrain
    from densessl.train.launch import launch, under_torchrun

    adopt_task_env()  # a task started by launch_tasks: torch.distributed's variables from SLURM's
    cfg = _config(args)
    mode = _resume_mode(args.resume)
    stage_argv = list(argv) if argv is not None else sys.argv[1:]
    if under_torchrun():
        return launch(stage_argv, 1, lambda: print(run_pretrain(cfg, args.run, mode)))
    run = cfg.run(args.run)
    layout = run_layout(cfg, run)
    with _lock(cfg.pretrain_dir(run)):
        if in_allocation() and layout.world > 1:
            return launch_tasks(stage_argv, layout.world, layout.gpus)
        if layout.nodes > 1:
            raise DenseSSLError(f"{run.id}: planned on {layout.nodes} nodes (pretrain.{run.method}.train.nodes); a "
                                f"multi-node run starts inside a SLURM job (snakemake --profile slurm, or python -m "
                                f"densessl launch --run {run.id}), or under your own torchrun --nnodes")
        return launch(stage_argv, pretrain_nproc(cfg, args.run), lambda: print(run_pretrain(cfg, args.run, mode)))


def check_report(cfg) -> int:  # noqa: ANN001
    """0 when every supervised-reference check of the built report passes; else 1, one line per failure."""
    from densessl.report.reference_check import report_failures

    failures, path = report_failures(cfg)
    for line in failures:
        print(f"check failed: {line}", file=sys.stderr)
    if not failures:
        print(f"{path}: the supervised reference beats the best random-init seed of its network on every protocol")
    return 1 if failures else 0


# stages that the DAG runs as jobs: each ends its log with one CPU line (densessl.cputime)
DAG_STAGES = frozenset({"data", "pretrain", "convert", "evaluate", "report"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    code = _main(args, argv)
    from densessl.train.launch import under_torchrun

    # the launcher's line counts its workers; a failed stage ends on its one error line alone
    if code == 0 and args.stage in DAG_STAGES and not under_torchrun():
        cputime.report(args.stage)
    return code


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    try:
        from densessl.progress import progress_interval

        progress_interval()  # a bad $DENSESSL_PROGRESS_INTERVAL fails here, not hours into a stage
        if args.stage == "doctor":
            doctor()
        elif args.stage == "synthesize":
            from densessl.data.synthetic import synthesize

            print(synthesize(args.dataset, args.out, args.size, args.seed))
        elif args.stage == "data":
            from densessl.stages.data import run_data

            print(run_data(_config(args), args.dataset))
        elif args.stage == "download":
            from densessl.data.acquire import ensure_dataset
            from densessl.data.catalog import load_catalog

            marker = ensure_dataset(args.dataset, args.root, mirror=args.mirror, catalog=load_catalog(args.catalog),
                                    downloads=args.downloads, retries=args.retries, interval=args.log_interval,
                                    coco_root=args.coco_root)
            print(f"{args.dataset}: complete under {marker['root']}; counts {marker['counts']}")
        elif args.stage == "datasets":
            _print_datasets(args)
        elif args.stage == "pretrain":
            return _pretrain(args, argv)
        elif args.stage == "launch":
            from densessl.launch.submitit_launch import launch_command

            return launch_command(args)
        elif args.stage == "convert":
            from densessl.stages.convert import run_convert

            print(run_convert(_config(args), args.run))
        elif args.stage == "export":
            from densessl.checkpoints.export import run_export

            print(run_export(_config(args), args.format, args.run, args.out))
        elif args.stage == "evaluate":
            from densessl.stages.evaluate import DETECTION_PROTOCOLS, run_evaluate, run_evaluate_timm

            if args.timm_model:
                if args.out is None:
                    raise DenseSSLError("evaluate --timm-model needs --out <metrics.json>")
                print(run_evaluate_timm(_config(args), args.protocol, args.timm_model, args.pretrained, args.out,
                                        args.device, img_size=args.img_size))
            elif args.img_size is not None:
                raise DenseSSLError("evaluate --img-size applies to --timm-model only; a --run's backbone keeps "
                                    "the size it was trained at")
            elif args.protocol in DETECTION_PROTOCOLS:
                from densessl.stages.evaluate import detection_nproc
                from densessl.train.launch import launch, under_torchrun

                cfg = _config(args)
                stage_argv = list(argv) if argv is not None else sys.argv[1:]
                # mmdet protocols: one process per GPU under torchrun (their published batch is per 8 GPUs)
                if under_torchrun():
                    return launch(stage_argv, 1, lambda: print(run_evaluate(cfg, args.protocol, args.run,
                                                                            args.device)))
                nproc = detection_nproc(cfg, args.protocol)
                with _lock(cfg.eval_metrics(args.protocol, cfg.run(args.run)).parent, "evaluation"):
                    return launch(stage_argv, nproc,
                                  lambda: print(run_evaluate(cfg, args.protocol, args.run, args.device)))
            else:
                cfg = _config(args)
                run = cfg.run(args.run)
                with _lock(cfg.eval_metrics(args.protocol, run).parent, "evaluation"):
                    print(run_evaluate(cfg, args.protocol, args.run, args.device))
        elif args.stage == "report":
            from densessl.report.build import build_report

            print(build_report(_config(args)))
        elif args.stage == "check-report":
            return check_report(_config(args))
        elif args.stage == "dvc-yaml":
            from densessl.dvc_stages import render

            print(render(_config(args)), end="")
        elif args.stage == "feature-stats":
            from densessl.stages.feature_stats import dump, format_rows, run_feature_stats

            rows = run_feature_stats(_config(args), args.images, args.protocol)
            print(dump(rows) if args.json else format_rows(rows))
        elif args.stage in ("plan", "status"):
            return _planning(args)
        elif args.stage == "targets":
            for target in _config(args).all_targets():
                print(target)
    except DenseSSLError as exc:
        print(f"densessl {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a full disk, a path under a file: the user's to fix, not a bug
        from densessl.errors import describe_os_error

        print(f"densessl {args.stage}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        from densessl.train.trainer import REQUEUE_EXIT_CODE, Preempted

        if isinstance(exc, Preempted):
            print(f"densessl {args.stage}: {exc}; exiting with {REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        raise
    except KeyboardInterrupt:
        print(f"densessl {args.stage}: interrupted; outputs are written atomically, re-run to continue",
              file=sys.stderr)
        return 130
    return 0
