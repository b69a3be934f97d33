"""Console entry point ``lifelong`` (the application floor: it may call every part).

Kept to argument parsing and calls; each subcommand's module is imported only
when that subcommand runs, and a command's flags come from a module that does not
load TensorFlow, so ``lifelong --help`` and ``lifelong <cmd> --help`` answer fast.

Subcommands: prepare, train, evaluate, compare, bench, export, precompute,
serve, cluster, cluster-bench, replay, staleness, and the report commands the registered
methods declare (:func:`tfmodels.registry.reports`: lrea-grid, encode-report,
cluster-quality, lcn-consistency). A user-facing error (:class:`tfmodels.errors.LifelongError`: a
bad flag, a missing or unusable input) ends with exit code 2 and one line
``lifelong <cmd>: error: <reason>`` on stderr; any other exception is a bug and
keeps its traceback (exit 1). Global flags: ``--debug`` (anywhere on the command
line) shows the traceback of a ``LifelongError`` too; ``--verbose`` (before the
command) shows TensorFlow's C++ start-up lines, silenced otherwise
(:mod:`lifelong.quiet`).
"""
from __future__ import annotations

# First: reads the user's TF_CPP_MIN_LOG_LEVEL before tfmodels sets its default.
from lifelong import quiet  # isort: skip

import argparse
import json
import os
import sys
import traceback
from typing import Dict, List, Optional, Tuple

from lifelong.bench.flags import SERVING_BENCHES
from tfmodels.errors import LifelongError

TRAIN_FLAGS = {  # flag -> (type, help); defaults come from TrainConfig
    "model": (str, "registered model name (din, din_l, avg_pool, ...)"),
    "out_dir": (str, "run directory (default runs/<model>-s<seed>-<time>)"),
    "seed": (int, "seed of every random choice (default 0)"),
    "short_len": (int, "S, the short window length (default 50)"),
    "long_len": (int, "L, the long window length (default 1000)"),
    "emb_dim": (int, "embedding size per field (default 16; behaviors are 2x wide)"),
    "mlp_hidden": (str, "head MLP sizes, comma separated (default 200,80)"),
    "din_hidden": (str, "DIN attention MLP sizes (default 80,40)"),
    "din_normalize": (str, "DIN attention weights: softmax (default) | none (the DIN paper's sum)"),
    "batch_size": (int, "batch size (default 256)"),
    "epochs": (int, "max epochs (default 3)"),
    "steps_per_epoch": (int, "cap steps per epoch; 0 = full pass (default 0)"),
    "learning_rate": (float, "learning rate (default 1e-3)"),
    "optimizer": (str, "adam | adagrad (default adam)"),
    "early_stopping_patience": (int, "epochs without val AUC gain before stopping; 0 = off"),
    "shuffle_buffer": (int, "shuffle buffer in examples (default 20000)"),
    "group_key": (str, "GAUC group feature (default user_id)"),
    "long_module_config": (str, "JSON object of long-module kwargs"),
    "crp_weight": (float, "lambda_CRP of LCN's contrastive loss, any model; needs "
                          "--cross_domain (0 = off, default; paper 0.1)"),
    "crp_negatives": (int, "CRP negative pairs per kind per batch (default 4096)"),
    "crp_tau": (float, "CRP temperature (default 0.1)"),
    "crp_lambdas": (str, "CRP pair-kind weights lambda_PT,lambda_PS,lambda_PC (default "
                         "1,1,1; 1,1,0 = without the cross-domain pair loss)"),
    "verbose": (int, "Keras progress: 1 bar, 2 a line per epoch, 0 silent"),
    "jit_compile": (str, "XLA for the training step: auto (default; = off, measured "
                         "slower on CPU) | on | off"),
    "din_path": (str, "DIN unit layout in training: valid (default; padded positions "
                      "skipped) | valid_prelu (valid as of session 8) | folded | rows | "
                      "per_candidate (the layout before issue 22; same function)"),
    "input_pipeline": (str, "input pipeline: parallel (default) | legacy (the pipeline "
                            "before issue 22; same batches)"),
}
LIST_FLAGS = ("mlp_hidden", "din_hidden")
FLOAT_LIST_FLAGS = ("crp_lambdas",)


class CliError(LifelongError):
    """A bad command line (one line, exit 2)."""


def _require_dataset(path: Optional[str], flag: str) -> None:
    """A user-given prepared-dataset path that has no meta.json is a user error: turn
    :func:`tfmodels.schema.read_meta`'s FileNotFoundError into one line here, at the
    one call whose FileNotFoundError means exactly that."""
    if not path:
        return
    from tfmodels import schema as S
    try:
        S.read_meta(path)
    except FileNotFoundError as e:
        raise CliError(f"{flag}: {e}") from e


def _add_train_flags(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("--config", help="JSON config file; explicit flags override it")
    p.add_argument("--config_dir", help="per-model configs <DIR>/<dataset>/<model>.json "
                   "(default: the repository's configs/; 'none' = off; docs/configs.md)")
    p.add_argument("--set", action="append", metavar="NAME.FIELD=VALUE",
                   help="override one field of one model's config, repeatable, e.g. "
                   "--set cformer.long_module_config.num_clusters=32 --set "
                   "din_l.learning_rate=0.001 (beats every other layer)")
    for name, (typ, help_) in TRAIN_FLAGS.items():
        if name == "model" and not with_model:
            continue
        p.add_argument(f"--{name}", type=typ, default=None, help=help_)
    p.add_argument("--use_user_embedding", action="store_true", default=None,
                   help="add a user-id embedding (profile) to the head")
    p.add_argument("--use_context", action="store_true", default=None,
                   help="add an hour-of-day context embedding to the head")
    p.add_argument("--head_batchnorm", action="store_true", default=None,
                   help="BatchNorm before each hidden activation of the head MLP (LREA paper)")
    p.add_argument("--cross_domain", action="store_true", default=None,
                   help="per-domain short windows + source-only long window (two-domain "
                        "data; docs/cross_domain.md)")


def _train_config(args, **overrides):
    from tfmodels.train import TrainConfig, load_config_file
    d = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {}
    for name in list(TRAIN_FLAGS) + ["use_user_embedding", "use_context", "head_batchnorm",
                                     "cross_domain", "data"]:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in LIST_FLAGS:
            try:
                value = [int(x) for x in str(value).split(",") if x.strip()]
            except ValueError:
                raise CliError(f"--{name} must be comma separated integers, got {value!r}")
        if name in FLOAT_LIST_FLAGS:
            try:
                value = [float(x) for x in str(value).split(",") if x.strip()]
            except ValueError:
                raise CliError(f"--{name} must be comma separated numbers, got {value!r}")
        if name == "long_module_config":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise CliError(f"--long_module_config is not valid JSON: {e}")
        flags[name] = value
    # per-model config files (configs/<dataset>/<model>.json) and --set: docs/configs.md
    from lifelong import model_configs
    d, _ = model_configs.resolve(args, d, flags, overrides)
    return TrainConfig.from_dict(d)


def _print_metrics(result: dict) -> None:
    """The metrics of one evaluation, one per line; an undefined metric prints as
    ``n/a (<reason>)`` (e.g. GAUC when no group has both labels), never ``nan``; a
    split too small for its AUC to mean anything adds a warning line on stderr."""
    from tfmodels import metrics as M
    keys = ("model", "split", "samples", "auc", "gauc", "logloss", "groups_used",
            "groups_skipped")
    for k in keys:
        if k in result:
            v = result[k]
            if k in ("auc", "gauc", "logloss"):
                print(f"{k:>15}: {M.format_metric(v, result.get(f'{k}_undefined'))}")
            else:
                print(f"{k:>15}: {v:.4f}" if isinstance(v, float) else f"{k:>15}: {v}")
    if "samples" in result and "positives" in result:
        warning = M.small_sample_warning(result["samples"], result["positives"],
                                         f"the {result.get('split', 'evaluated')} split")
        if warning:
            print(f"[evaluate] {warning}", file=sys.stderr)


# ---- subcommands -------------------------------------------------------------------------
def cmd_prepare(args, extra: List[str]) -> int:
    from beam_jobs import prepare
    report = prepare.run(args, extra)
    rows = report.get("rows", {})
    print(json.dumps({"output": args.output, "rows": rows,
                      "impressions": report.get("stats", {}).get("impressions")}, indent=2))
    return 0


def cmd_train(args, extra: List[str]) -> int:
    from tfmodels import train as T
    cfg = _train_config(args)
    _require_dataset(cfg.data, "--data")
    from lifelong import model_configs
    files = model_configs.load(args.model or cfg.model, model_configs.dataset_of(cfg.data),
                               model_configs.config_root(args.config_dir)).files
    print(f"[train] config of {args.model or cfg.model}: "
          + (" <- ".join(reversed(files)) or "built-in (no config file)"), file=sys.stderr)
    summary = T.train(cfg, resume=args.resume, distribute=args.distribute,
                      shard_policy=args.shard_policy)
    print(f"[train] done in {summary['train_wall_s']:.1f}s; run dir {cfg.out_dir}",
          file=sys.stderr)
    if not args.no_eval and summary["distribute"]["is_chief"]:   # one evaluation per run
        result = T.evaluate(cfg.out_dir, cfg.eval_split)
        _print_metrics(result)
    return 0


def cmd_evaluate(args, extra: List[str]) -> int:
    from tfmodels import train as T
    _require_dataset(args.data, "--data")
    result = T.evaluate(args.run, args.split, data=args.data, group_key=args.group_key,
                        batch_size=args.batch_size)
    _print_metrics(result)
    print(f"[evaluate] wrote {os.path.join(args.run, f'metrics-{args.split}.json')}",
          file=sys.stderr)
    return 0


def cmd_compare(args, extra: List[str]) -> int:
    from lifelong import compare
    return compare.run(args, extra, _train_config)


# Subcommands whose flags live in their own module (imported only when that
# subcommand runs, so `lifelong --help` stays fast): name -> (module, help, extras
# are Beam pipeline options[, "module:function" of its flags when they are not the
# module's add_arguments]). The report commands of methods are added from the
# registry (module_commands()).
MODULE_COMMANDS = {
    "cluster": ("beam_jobs.cluster", "TWIN V2 hierarchical clustering of histories (Beam)", True,
                "beam_jobs.flags:add_cluster_arguments"),
    "cluster-bench": ("lifelong.bench.clustering",
                      "TWIN V2 clustering speed and accuracy per user (benchmark)", False),
    "replay": ("lifelong.replay", "replay a compare's test requests through export, Beam "
               "precompute and the local gRPC server: AUC, parity, latency", False),
    "claims": ("lifelong.reports.claims_tables", "the papers' claims checked against one or "
               "more `bench accuracy` tables (accuracy.json or Markdown), merged per model",
               False),
    "staleness": ("lifelong.reports.staleness", "AUC of served CTRs against the age of the "
                  "user cache (0, 1, 3, 7, 14 days): table and PNG per trained model", False),
}


def report_module(command: str) -> str:
    """The module that implements a report command a method declares in the registry."""
    return "lifelong.reports." + command.replace("-", "_")


def module_commands() -> Dict[str, Tuple]:
    """:data:`MODULE_COMMANDS` plus every report command of the registry
    (:func:`tfmodels.registry.reports`), in registry order. A report module takes
    unknown flags only when it says so (``ALLOW_EXTRA = True``, read when it runs)."""
    from tfmodels import registry      # no TensorFlow: the registry imports lazily
    out = dict(MODULE_COMMANDS)
    for command, (report, _) in registry.reports().items():
        if command in out or command in _BUILTIN_COMMANDS:
            raise ValueError(f"registry report {command!r} clashes with a lifelong command")
        out[command] = (report_module(command), report.help, False)
    return out


def cmd_module(args, extra: List[str]) -> int:
    import importlib
    result = importlib.import_module(args.module).run(args, extra)
    return result if isinstance(result, int) else 0


def cmd_bench(args, extra: List[str]) -> int:
    """``lifelong bench WHAT``: the module :mod:`lifelong.bench.<WHAT>` runs it."""
    import importlib
    if args.what == "accuracy":          # trains: compare's flags and configs
        from lifelong.bench import accuracy
        return accuracy.run(args, extra, _train_config)
    if args.what not in SERVING_BENCHES:
        if not args.data:
            raise CliError("--data is required (a prepared dataset directory)")
        _require_dataset(args.data, "--data")
    return importlib.import_module(f"lifelong.bench.{args.what}").run(args)


def cmd_export(args, extra: List[str]) -> int:
    from serving import export
    out = export.run(args)
    print(json.dumps({"name": out["name"], "version": out["version"], "path": out["path"]}))
    return 0


def cmd_precompute(args, extra: List[str]) -> int:
    from beam_jobs import precompute
    store = None
    if args.store:
        from serving.cache_store import open_store
        store = open_store(args.store)
    try:
        report = precompute.run(args, extra, store=store)
    finally:
        if store is not None:
            store.close()
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(args, extra: List[str]) -> int:
    from lifelong.bench import identity   # serving.server + the bench's --identity
    return identity.run(args)


# ---- parser --------------------------------------------------------------------------------
def build_parser(prepare_flags: bool = True, command: Optional[str] = None
                 ) -> argparse.ArgumentParser:
    """The parser. Flags of ``prepare`` and of :data:`MODULE_COMMANDS` are added only
    for the command being run (``prepare_flags`` / ``command``), so other commands
    and ``--help`` do not import Beam or TensorFlow."""
    parser = argparse.ArgumentParser(
        prog="lifelong", description="Lifelong user-behavior CTR: prepare data with Beam, "
        "train and evaluate Keras models.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user-facing errors too (they are one "
                        "line otherwise); may also be given after the command")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's C++ start-up and log lines (CUDA probing, "
                        "oneDNN, absl; silenced by default unless TF_CPP_MIN_LOG_LEVEL is "
                        "set); give it before the command (after train/compare, --verbose N "
                        "is Keras' progress)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="build per-user TFRecords with Apache Beam",
                       description="Build per-user records (history once + labeled "
                       "impressions) with Apache Beam. Extra flags are Beam pipeline options "
                       "(--runner, --direct_running_mode=multi_processing, Dataflow options).")
    if prepare_flags:
        from beam_jobs import flags as beam_flags      # no Beam, no TensorFlow
        beam_flags.add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare, allow_extra=True)

    p = sub.add_parser("train", help="train a model with Keras fit",
                       description="Train a registered model on a prepared dataset; "
                       "evaluates on the test split afterwards unless --no_eval.")
    p.add_argument("--data", help="prepared dataset directory (lifelong prepare --output)")
    _add_train_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's last checkpoint")
    p.add_argument("--no_eval", action="store_true", help="skip the test evaluation")
    p.add_argument("--distribute", default="none", choices=("none", "mirrored", "multi_worker"),
                   help="none (default) | mirrored (the devices of one machine) | "
                   "multi_worker (MultiWorkerMirroredStrategy over the workers in TF_CONFIG; "
                   "run the same command on every worker; needs --out_dir and "
                   "--steps_per_epoch); --batch_size is the global batch (docs/distributed.md)")
    p.add_argument("--shard_policy", default="file", choices=("file", "data"),
                   help="multi_worker input sharding: file (default; each worker reads its "
                   "own TFRecord files) | data (every worker reads all, keeps its share)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="AUC, GAUC and logloss of a trained run",
                       description="Evaluate a run directory on a split; prints and writes "
                       "metrics-<split>.json.")
    p.add_argument("--run", required=True, help="run directory written by `lifelong train`")
    p.add_argument("--split", default="test", help="train | valid | test (default test)")
    p.add_argument("--data", help="evaluate on another prepared dataset with the same vocab")
    p.add_argument("--group_key", help="GAUC group feature (default: the run's, user_id)")
    p.add_argument("--batch_size", type=int, help="evaluation batch size")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="prepare + train + evaluate several models x seeds",
                       description="One command for accuracy comparisons: prepares the data "
                       "(synthetic by default, or --data PATH of MovieLens/Taobao files), "
                       "trains every model for every seed, evaluates on the test split and "
                       "prints mean and std of AUC, GAUC and logloss. Extra flags go to the "
                       "prepare step.")
    p.add_argument("--data", help="raw input: a MovieLens folder (ratings.csv + movies.csv, "
                   "ratings.dat + movies.dat or u.data + u.item), "
                   "a Tianchi 56 display-ad folder (raw_sample.csv, ...: taobao_ad) "
                   "or a Taobao UserBehavior.csv; default: the synthetic generator")
    p.add_argument("--source", choices=["synthetic", "movielens", "taobao", "taobao_ad"],
                   help="input kind (default: detected from --data)")
    p.add_argument("--prepared", help="use an already prepared dataset directory instead")
    p.add_argument("--clustered", help="a `lifelong cluster` output of the same data: the "
                   "models whose registry entry needs a clustered history ("
                   + ", ".join(_needing_clusters()) + ") train on it, all others on --prepared")
    p.add_argument("--models", default="din,din_l,avg_pool",
                   help="comma separated registered models (default din,din_l,avg_pool)")
    p.add_argument("--seeds", default="0", help="comma separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--work_dir", help="where data, runs and results go "
                   "(default artifacts/compare-<time>)")
    _add_train_flags(p, with_model=False)
    p.add_argument("--resume", action="store_true",
                   help="reuse runs in --work_dir that already finished with the same "
                   "config and continue interrupted ones from their checkpoint")
    p.set_defaults(func=cmd_compare, allow_extra=True)

    p = sub.add_parser("bench", help="benchmarks that print numbers (storage, train, "
                       "serving, precompute, accuracy)",
                       description="Benchmarks: `storage` (bytes on disk vs materialised "
                       "windows at several L), `train` (training examples/s vs L), `serving` "
                       "(rank / one-shot / identity gRPC latency; `lifelong bench serving "
                       "--help`), `precompute` (user-cache users/s and bytes per user), "
                       "`accuracy` (every model x seeds to its early stop, rank p50, cache "
                       "bytes, the papers' claims; `lifelong bench accuracy --help`).")
    from lifelong.bench import flags as bench_flags      # no TensorFlow
    if _ARGV_HINT.get("bench") in SERVING_BENCHES:
        bench_flags.add_serving_arguments(p)
    elif _ARGV_HINT.get("bench") == "accuracy":     # lifelong/bench/accuracy.py (no TF)
        from lifelong.bench import accuracy
        accuracy.add_arguments(p)
        _add_train_flags(p, with_model=False)
    else:
        bench_flags.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export split-signature SavedModels for TF Serving",
                       description="Write saved_models/<model>/<version>/ (signatures "
                       "user_tower, rank, serving_default; docs/serving.md) atomically and "
                       "refresh saved_models/models.config.")
    _module_arguments(p, "export", "serving.flags:add_export_arguments")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("precompute", help="per-user cache: Beam + tfx-bsl RunInference",
                       description="Run the user_tower signature over per-user records with "
                       "tfx-bsl RunInference (Apache Beam), write one cache TFRecord per user "
                       "and optionally load them into a store. Extra flags are Beam options.")
    _module_arguments(p, "precompute", "beam_jobs.flags:add_precompute_arguments")
    p.set_defaults(func=cmd_precompute, allow_extra=True)

    p = sub.add_parser("serve", help="local gRPC server speaking TF Serving's API",
                       description="Serve saved_models/ over TensorFlow Serving's gRPC API "
                       "(Predict, GetModelMetadata, GetModelStatus); picks up new versions "
                       "without a restart; binds to 127.0.0.1 by default.")
    _module_arguments(p, "serve", "lifelong.bench.flags:add_identity_server_arguments")
    p.set_defaults(func=cmd_serve)

    for name, (module_name, help_, beam_extra, *flags) in module_commands().items():
        p = sub.add_parser(name, help=help_, description=help_ + (
            ". Extra flags are Beam pipeline options." if beam_extra else "."))
        p.set_defaults(func=cmd_module, module=module_name, allow_extra=beam_extra)
        module = _module_arguments(p, name, flags[0] if flags else module_name)
        if getattr(module, "ALLOW_EXTRA", False):
            p.set_defaults(allow_extra=True)
    return parser


# Commands built into build_parser (a registry report may not take their names).
_BUILTIN_COMMANDS = ("prepare", "train", "evaluate", "compare", "bench", "export",
                     "precompute", "serve")


def _needing_clusters() -> List[str]:
    from tfmodels import registry
    return registry.needing(registry.CLUSTERED_HISTORY)


# Filled by main() from argv: which subcommand (and bench kind) is being parsed, so a
# subcommand's flags are imported from its module only when it runs.
_ARGV_HINT: dict = {}


def _module_arguments(p: argparse.ArgumentParser, command: str, module: str):
    """Add the flags of ``module`` (its ``add_arguments``, or ``"module:function"``) to
    ``p`` when ``command`` is the one being run; returns the imported module (None for
    the other commands, whose modules are not imported). A command's flags module
    must not import TensorFlow (tests/test_cli.py holds it)."""
    if _ARGV_HINT.get("command") == command:
        import importlib
        name, _, function = module.partition(":")
        mod = importlib.import_module(name)
        getattr(mod, function or "add_arguments")(p)
        return mod
    return None


#: commands that train models: their processes get TensorFlow's oneDNN kernels
#: (:func:`tfmodels._env.prefer_onednn_for_training`), as does ``bench accuracy``
TRAINING_COMMANDS = ("train", "compare")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug is global: accepted anywhere before a `--` separator.
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    command = next((a for a in argv if not a.startswith("-")), None)
    # --verbose is global before the command (after it, train's --verbose N is Keras').
    before = argv[:argv.index(command)] if command else argv
    quiet.configure(verbose="--verbose" in before)
    rest = argv[argv.index(command) + 1:] if command else []
    _ARGV_HINT.clear()
    _ARGV_HINT.update(command=command, bench=next(
        (a for a in rest if a in SERVING_BENCHES + ("accuracy",)), None)
        if command == "bench" else None)
    if command in TRAINING_COMMANDS or _ARGV_HINT["bench"] == "accuracy":
        from tfmodels._env import prefer_onednn_for_training
        prefer_onednn_for_training()   # before TensorFlow loads; TF_ENABLE_ONEDNN_OPTS wins
    parser = build_parser(prepare_flags=command == "prepare", command=command)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Only LifelongError (a user mistake) becomes one line; any other exception is a
    # bug and propagates with its traceback (the interpreter exits 1).
    try:
        return args.func(args, extra) or 0
    except KeyboardInterrupt:
        print(f"lifelong {args.command}: interrupted", file=sys.stderr)
        return 130
    except LifelongError as e:
        if debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lifelong {args.command}: error: {msg}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
