"""The `spacil` command line (INTERFACES.md).

Exit status: 0 done; 2 bad input or usage, with one line on standard error naming the culprit; 1 anything unexpected;
130 interrupted (every finished result is kept; `--resume` continues).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from spacil.errors import InputError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on standard error and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise InputError(f"{self.prog}: {message}")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="one class-incremental run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML config, or the name of a packaged one (e.g. cifar224_b0)")
    source.add_argument("--features", help="a feature store (INTERFACES.md); needs nothing else")
    p.add_argument("--method", help="spa (default), zeroshot, simplecil, finetune, proof, rapf, ranpac, bofa")
    p.add_argument("--init-cls", type=int, help="classes in the first task")
    p.add_argument("--increment", type=int, help="classes in each later task")
    p.add_argument("--seed", type=int, help="the one seed (class order, batches, sampling)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set top_k_patches=8 or --set ablation.optimal_transport=false")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished task")
    p.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda or cuda:N (the config key `device`)")
    p.add_argument("--quiet", action="store_true")


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="encode a data set once with the frozen CLIP into a feature store (resumable)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name, or local-dir:PATH")
    p.add_argument("--pretrained", default="laion400m_e32", help="open_clip pretrained tag or a local checkpoint file")
    p.add_argument("--out", required=True, help="the store folder")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: the machine's cores on CUDA, 0 on the CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun "
                   "each rank uses cuda:LOCAL_RANK")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast precision of the encoders (default: the store's when resuming, else bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--views", type=int, default=0, help="also encode N views of every training image (ENGINE; docs/extraction.md)")
    p.add_argument("--view-transform", default=None, help="gaussian-noise (ENGINE's, the default), flip-jitter, or AREA's "
                   "occlusion / area-augment (views of a second transform are kept beside the first)")
    p.add_argument("--view-noise", type=float, default=None, help="gaussian-noise's std (default 0.25)")
    p.add_argument("--view-seed", type=int, default=0, help="the views' seed (each image's view v: its own generator)")
    p.add_argument("--pairwise-descriptions", help="ENGINE's pairwise descriptions (JSON) to encode into the store")
    p.add_argument("--area-descriptions", help="AREA's description sets (`spacil descriptions import --format area-sets`) "
                   "to encode into the store")
    p.add_argument("--names-file", help="class names to check against the folders (a warning on mismatch, never a shift)")
    from spacil.data.check import add_names_and_templates

    add_names_and_templates(p)
    p.add_argument("--descriptions", help="a descriptions file whose sentences become the store's semantic tokens")
    p.add_argument("--semantic-tokens", default="sentence", choices=["sentence", "word"])
    p.add_argument("--no-pre-projection", dest="pre_projection", action="store_false", default=None,
                   help="do not store z, the image features before visual.proj (RanPAC, BOFA, ENGINE need them)")
    p.add_argument("--quiet", action="store_true")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="a comparison table (Markdown and CSV) and plots of runs, or the tables of a sweep")
    p.add_argument("runs", nargs="+", help="run folders, or one sweep folder (then also LaTeX, mean +- std over seeds)")
    p.add_argument("--out", help="where to write report.md, report.csv and the plots (default: the first run's parent)")


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="validate a feature store file by file (every row); exit 0, or 2 with one line per fault")
    p.add_argument("store", help="the feature store folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="a grid of runs (configs or stores x methods x variants x seeds), locally or on SLURM")
    p.add_argument("sweep", help="a sweep YAML file, or the name of a packaged one (e.g. paper_grid)")
    p.add_argument("--out", required=True, help="the sweep folder: one run folder per cell under it")
    p.add_argument("--executor", default="local", choices=["local", "slurm"],
                   help="local: a pool of worker processes here; slurm: a job array through submitit")
    p.add_argument("--jobs", type=int, default=1, help="local workers at once (each one GPU, or cores // N threads)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and what would be skipped, resumed or run")
    p.add_argument("--force", action="store_true", help="redo cells whose settings changed since they ran")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="what a run's learner saw in photos: picked patches, transport plan, class scores")
    p.add_argument("run", help="a run folder (its checkpoints/last.pt)")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--row", action="append", default=[], metavar="SPLIT:INDEX", help="a stored image of the store, by row")
    p.add_argument("--store", help="the run's feature store (default: the one its config.yaml names)")
    p.add_argument("--class", dest="class_name", help="the true class: its picked patches and plan are drawn too")
    p.add_argument("--top", type=int, default=5, help="classes in the score chart")
    p.add_argument("--descriptions", help="the descriptions file, when it moved since extraction")
    p.add_argument("--pretrained", help="the backbone's checkpoint file, when it moved since extraction (sha256 checked)")
    p.add_argument("--out", default="explain", help="where <image>.png and <image>.json go")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from spacil import __version__

    parser = _Parser(prog="spacil", description="SPA for class-incremental learning on a frozen CLIP")
    parser.add_argument("--version", action="version", version=f"spacil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="the embedded default: SPA and baselines on an offline demo world")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--quick", action="store_true", help="a smaller world and fewer epochs (for smoke tests)")
    demo.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    _add_extract(sub)
    from spacil.data.check import add_data_parser

    add_data_parser(sub)
    _add_run(sub)
    _add_report(sub)
    _add_check(sub)
    _add_sweep(sub)
    _add_explain(sub)
    from spacil.describe.client import add_describe_parsers

    add_describe_parsers(sub, _Parser)
    return parser


def _run_config(args):
    from spacil.config import build_config, load_config

    overrides = list(args.overrides)
    for flag, key in ((args.method, "method"), (args.init_cls, "data.init_cls"), (args.increment, "data.increment"),
                      (args.seed, "seed"), (args.device, "device")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.features:
        overrides.append(f"data.features={args.features}")
        return build_config({}, overrides, source="--set")
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from spacil.pipeline import prepare_store
    from spacil.runner import run_from_store
    from spacil.sweep.lifeline import follow_parent

    follow_parent()  # a sweep's worker ends with its sweep
    config = _run_config(args)
    store = prepare_store(config, progress=not args.quiet)
    echo = None if args.quiet else print
    run_from_store(config, store, args.out, resume=args.resume, echo=echo, progress=not args.quiet)
    return 0


def cmd_extract(args) -> int:
    from spacil.describe.descriptions import load_descriptions
    from spacil.store.additions import add_engine_inputs, check_view_request
    from spacil.store.extract import extract_store

    check_view_request(args.views, args.view_transform, args.view_noise)
    descriptions = load_descriptions(args.descriptions).sentences if args.descriptions else None
    extract_store(args.dataset, args.data_root, args.out, model=args.model, pretrained=args.pretrained, dtype=args.dtype,
                  batch_size=args.batch_size, workers=args.workers, device=args.device, names_file=args.names_file,
                  class_names=args.class_names, templates=args.templates, descriptions=descriptions,
                  descriptions_source=args.descriptions, semantic_tokens=args.semantic_tokens, progress=not args.quiet,
                  precision=args.precision, pre_projection=args.pre_projection, views=args.views)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one process adds ENGINE's inputs to the finished store
        add_engine_inputs(args.out, args.dataset, args.data_root, model=args.model, pretrained=args.pretrained,
                          device=args.device, pairwise_descriptions=args.pairwise_descriptions, views=args.views,
                          view_transform=args.view_transform, view_noise=args.view_noise, view_seed=args.view_seed,
                          area_descriptions=args.area_descriptions, batch_size=args.batch_size, names_file=args.names_file, progress=not args.quiet)
    if not args.quiet and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"feature store written: {args.out}")
    return 0


def cmd_data(args) -> int:
    from spacil.data.check import run_data_check

    return run_data_check(args.dataset, args.data_root, class_names=args.class_names, names_file=args.names_file,
                          templates=args.templates, quiet=args.quiet, model=args.model, pretrained=args.pretrained,
                          out=args.out, dtype=args.dtype)


def cmd_report(args) -> int:
    from spacil.report import write_report
    from spacil.sweep.report import is_sweep_folder, write_sweep_report

    if len(args.runs) == 1 and is_sweep_folder(args.runs[0]):
        print(write_sweep_report(args.runs[0], args.out))
        return 0
    table = write_report(args.runs, args.out)
    print(table)
    return 0


def cmd_sweep(args) -> int:
    from spacil.sweep.grid import run_sweep

    return run_sweep(args.sweep, args.out, executor=args.executor, jobs=args.jobs, dry_run=args.dry_run, force=args.force,
                     progress=not args.quiet)


def cmd_demo(args) -> int:
    from spacil.demo.run import run_demo

    run_demo(args.out, quick=args.quick, device=args.device)
    return 0


def cmd_explain(args) -> int:
    from spacil.explain import explain_images

    explain_images(args.run, args.images, store=args.store, class_name=args.class_name, top=args.top, out=args.out,
                   device=args.device, descriptions=args.descriptions, rows=args.row, pretrained=args.pretrained)
    return 0


def cmd_check(args) -> int:
    from spacil.store.check import main_check

    return main_check(args.store, quiet=args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.simplefilter("default")
    try:
        args = build_parser().parse_args(argv)
        handler = {"run": cmd_run, "extract": cmd_extract, "report": cmd_report, "demo": cmd_demo,
                   "check": cmd_check, "sweep": cmd_sweep, "data": cmd_data, "explain": cmd_explain}.get(args.command)
        if handler is None:
            from spacil.describe.client import dispatch

            return dispatch(args)
        return handler(args)
    except InputError as err:
        print(f"spacil: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spacil: interrupted; finished results are kept (run again, with --resume for `run`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
