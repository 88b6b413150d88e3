"""`edge-coordinator train`: pipeline training over the agents (see edgecluster/train/)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

from edgecluster.plan.pipeline import SCHEDULES, PipelineOptions


def add_train_parser(sub: Any) -> None:
    from coordinator.cli import add_cluster_args

    train = sub.add_parser(
        "train",
        help="train or fine-tune a model over the agents (a pipeline; SkipPipe paths)",
        description="Pipeline training over the agents: stage 0 (embedding, head, loss) and "
        "layer stages, each micro-batch on its own path (skippipe skips and swaps stages).",
    )
    train.add_argument(
        "--model", required=True, help="smollm2-135m | checkpoint dir | .gguf | CONFIG.json "
        "(a Llama config.json trains from scratch, random init from --seed)",
    )  # fmt: skip
    train.add_argument("--data", nargs="+", type=Path, default=[], help="text or .jsonl files")
    add_cluster_args(train)
    train.add_argument("--schedule", choices=SCHEDULES, default="skippipe")
    train.add_argument("--stages", type=int, help="pipeline stages (default: chosen by the plan)")
    train.add_argument("--skip-ratio", type=float, default=0.33)
    train.add_argument("--max-swaps", type=int, default=2)
    train.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    train.add_argument("--micro-batches", type=int, default=8, help="micro-batches per iteration")
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=10, help="steps (0: at the end only)")
    train.add_argument("--eval-batches", type=int, default=4)
    train.add_argument("--checkpoint-dir", type=Path, default=Path("edgecluster-checkpoints"))
    train.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: at the end)")
    train.add_argument("--resume", action="store_true", help="go on from the latest checkpoint")
    train.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    train.add_argument("--json", action="store_true", help="--dry-run: the plans as JSON")
    train.add_argument("--log-json", type=Path, help="append one JSON object per step here")
    train.add_argument("--no-progress", action="store_true", help="no live bar on stderr")


def _options(args: argparse.Namespace) -> Any:
    from edgecluster.train.options import TrainOptions

    pipeline = PipelineOptions(
        schedule=args.schedule, num_stages=args.stages, skip_ratio=args.skip_ratio,
        max_swaps=args.max_swaps, micro_batch_size=args.micro_batch,
        num_micro_batches=args.micro_batches, seq_len=args.seq_len, seed=args.seed,
    )  # fmt: skip
    return TrainOptions(
        model=args.model, data=tuple(args.data), pipeline=pipeline, steps=args.steps,
        lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, log_json=args.log_json,
        cluster_file=args.cluster, dry_run=args.dry_run, progress=not args.no_progress,
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from edgecluster.errors import EdgeClusterError

    try:
        options = _options(args)
        if options.dry_run and options.cluster_file is not None:
            return _dry_run_file(options, args.json)
        return _train(args, options)
    except (ValueError, EdgeClusterError) as exc:
        print(f"edge-coordinator train: {exc}", file=sys.stderr)
        return 2


def _dry_run_file(options: Any, as_json: bool) -> int:
    from edgecluster.config import cache_root
    from edgecluster.plan.cluster_file import load_cluster_file
    from edgecluster.plan.pipeline import compare_schedules
    from edgecluster.plan.pipeline_describe import describe_plan, plan_to_dict
    from edgecluster.train.driver import load_model

    cfg, _ = load_model(options.model, cache_root())
    cluster = load_cluster_file(options.cluster_file)
    plans = compare_schedules(cluster, cfg, options.pipeline)
    if as_json:
        print(json.dumps({name: plan_to_dict(p) for name, p in plans.items()}))
    else:
        print(describe_plan(plans[options.pipeline.schedule], plans))
    return 0


def _train(args: argparse.Namespace, options: Any) -> int:
    from coordinator.cli import cluster_fields, ready_to_run, resolve_api_key
    from edgecluster.config import CoordinatorConfig
    from edgecluster.net.auth import generate_token
    from edgecluster.runtime.coordinator import CoordinatorNode

    token = args.token or generate_token()
    api_key, _ = resolve_api_key(args)
    config = CoordinatorConfig(**cluster_fields(args, token, api_key, model="none"))
    stop = ready_to_run(config)
    if stop is None:
        return 2
    node = CoordinatorNode(config)
    http_stop = threading.Event()
    try:
        run = _training_run(node, config, options)  # reads the data before agents start
        node.start()
        if not args.token:
            print(f"generated cluster token: {token}", flush=True)
        print(f"join a device:  edge-agent join {node.grpc_address} --token {token}", flush=True)
        return _run(node, run, options, stop, http_stop)
    finally:
        http_stop.set()
        node.stop()


def _training_run(node: Any, config: Any, options: Any) -> Any:
    from edgecluster.net.datachannel import DataListener
    from edgecluster.net.grpc_util import open_channel
    from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
    from edgecluster.plan.cluster_file import load_links
    from edgecluster.runtime.session_open import SessionLinks
    from edgecluster.train.driver import TrainingRun

    links = SessionLinks(
        listener=DataListener(config.host, config.data_port), host=config.host,
        link_table=load_links(config.cluster_file) if config.cluster_file else None,
        token=config.token, encrypt=config.tls.serves_tls, link_delay_ms=config.link_delay_ms,
        stub_for=lambda m: pb_grpc.AgentStub(open_channel(m.address, config.token, config.tls)),
    )  # fmt: skip
    try:
        return TrainingRun(
            options, membership=node.membership, links=links, cache_dir=config.cache_dir,
            min_agents=config.min_agents,
        )  # fmt: skip
    except BaseException:
        links.listener.close()
        raise


def _run(node: Any, run: Any, options: Any, stop: threading.Event, http_stop: Any) -> int:
    from edgecluster.runtime.coordinator import _serve_http

    try:
        http = threading.Thread(
            target=lambda: asyncio.run(_serve_http(node, http_stop, training=run.progress.view)),
            name="http", daemon=True,
        )  # fmt: skip
        http.start()
        if options.dry_run:
            return _dry_run_live(run, stop)
        final = run.run(stop)
    finally:
        run._links.listener.close()
    if final is None:
        print("training stopped before its last step", file=sys.stderr)
        return 1
    print(f"\ntrained {options.steps} steps; checkpoint: {final}")
    print(f"serve it:  edge-coordinator serve --model {final}", flush=True)
    return 0


def _dry_run_live(run: Any, stop: threading.Event) -> int:
    """--dry-run without --cluster: plan over the agents that join, print, exit."""
    from edgecluster.plan.pipeline_describe import describe_plan
    from edgecluster.train.driver import cluster_of

    members = run.wait_for_agents(stop)
    if members is None:
        return 1
    from edgecluster.plan.pipeline import compare_schedules

    cluster = cluster_of(members, None)
    plans = compare_schedules(cluster, run.cfg, run.options.pipeline)
    print(describe_plan(plans[run.options.pipeline.schedule], plans))
    return 0
